// Moonwalk — umbrella header: the public API.
#pragma once

#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/layers/activations.hpp"
#include "moonwalk/layers/linear.hpp"
#include "moonwalk/losses/losses.hpp"
#include "moonwalk/nets/any_layer.hpp"
#include "moonwalk/nets/network.hpp"
#include "moonwalk/nets/parameters.hpp"
#include "moonwalk/nets/sequential.hpp"
#include "moonwalk/schedules/backprop.hpp"
#include "moonwalk/schedules/gradient.hpp"
#include "moonwalk/schedules/result.hpp"
