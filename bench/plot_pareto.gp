# Time against memory of every schedule on one network, from the summary that
# bench/pareto.sh writes (OUT_DIR/pareto-summary.csv; columns: see pareto.sh).
#
#   gnuplot -e "csv='out/pareto-summary.csv'; net='mlp16'; out='out/pareto-mlp16.png'; batch='1024'" \
#           bench/plot_pareto.gp
#
# x = median peak RSS above the baseline (MiB, log), y = median seconds per
# step (log); one labelled point per schedule that ran (filled: on the Pareto
# front, open: dominated), the binomial points (slots 2 … 16) joined as a
# curve, and the planner's (planned:BUDGET, budgets falling) as another. A peak of 0 or less (below the RSS
# resolution) is drawn at XFLOOR MiB.
if (!exists("csv")) csv = 'pareto-summary.csv'
if (!exists("net")) net = 'mlp16'
if (!exists("out")) out = 'pareto-'.net.'.png'
if (!exists("batch")) batch = '?'

XFLOOR = 1.0 / 256  # 4 KiB
set datafile separator ","
set datafile missing ""

if (out[strlen(out)-3:] eq '.svg') {
  set terminal svg size 900,660 dynamic font "Sans,11"
} else {
  # pngcairo where the build has it (dashed lines), else libgd's png
  if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {
    set terminal pngcairo size 900,660 font "Sans,10"
  } else {
    set terminal png size 900,660 font "Sans,10"
  }
}
set output out

set logscale xy
# Labelled tics at 1, 2, 5 × 10^k (a plot often spans less than a decade).
set format x "%g"
set format y "%g"
do for [e = -6:6] {
  do for [m in "1 2 5"] {
    set xtics add (real(m) * 10.0**e)
    set ytics add (real(m) * 10.0**e)
  }
}
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set xlabel "peak RSS above baseline (MiB, median over repeats)"
set ylabel "seconds per step (median over repeats)"
set title sprintf("%s (batch %s): time against memory per schedule", net, batch)
set key below horizontal
# The data's range (fix: not widened to whole decades), then room for the labels.
set autoscale xfix
set autoscale yfix
set offsets graph 0.1, graph 0.25, graph 0.15, graph 0.15

here(s) = (strcol(1) eq net && column(3) > 0)
is_binomial(s) = (s[1:9] eq "binomial:")
is_planned(s) = (s[1:8] eq "planned:")
on_curve(s) = is_binomial(s) || is_planned(s)
xv = "(here(0) ? (column(8) > 0 ? column(8) / 1048576.0 : XFLOOR) : NaN)"
colour(s) = s eq "backprop" ? 0x000000 : \
            is_binomial(s) ? 0x1f77b4 : \
            is_planned(s) ? 0x17becf : \
            s eq "checkpoint" ? 0xff7f0e : \
            s eq "mixed" ? 0xd62728 : \
            s eq "revbackprop" ? 0x2ca02c : \
            s eq "mixed-rebuild" ? 0x9467bd : 0x7f7f7f

# The front is the filled points (a line through them, sorted with the other
# networks' rows as undefined points, skipped some of them); the binomial
# points in the summary's row order, which is the slots' (2, 4, 8, 16).
# Labels: binomial ones under their points (the curve's), the others above right.
plot csv every ::1 using (here(0) && is_binomial(strcol(2)) ? @xv : NaN):6 \
       with lines lw 2.5 lc rgb "#1f77b4" title "binomial, slots 2 … 16", \
     csv every ::1 using (here(0) && is_planned(strcol(2)) ? @xv : NaN):6 \
       with lines lw 2.5 lc rgb "#17becf" title "planned, budgets falling", \
     csv every ::1 using (here(0) && strcol(19) eq "yes" ? @xv : NaN):6:(colour(strcol(2))) \
       with points pt 7 ps 1.6 lc rgb variable notitle, \
     csv every ::1 using (here(0) && strcol(19) ne "yes" ? @xv : NaN):6:(colour(strcol(2))) \
       with points pt 6 ps 1.6 lw 1.5 lc rgb variable notitle, \
     NaN with points pt 7 ps 1.6 lc rgb "#555555" title "on the front", \
     NaN with points pt 6 ps 1.6 lw 1.5 lc rgb "#555555" title "dominated", \
     csv every ::1 using (on_curve(strcol(2)) ? @xv : NaN):6:2:(colour(strcol(2))) \
       with labels center offset char 0, char -1.2 tc rgb variable notitle, \
     csv every ::1 using (on_curve(strcol(2)) ? NaN : @xv):6:2:(colour(strcol(2))) \
       with labels left offset char 1.2, char 0.6 tc rgb variable notitle
