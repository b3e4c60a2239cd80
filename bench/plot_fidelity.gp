# Memory against gradient error for every row of bench/results/fidelity.csv
# (written by bench/fidelity.sh; columns: see bench/fidelity.cpp).
#
#   gnuplot -e "csv='bench/results/fidelity.csv'; out='bench/results/fidelity_memory_vs_error.png'" \
#           bench/plot_fidelity.gp
#
# x = residual_bytes / backprop_bytes (log), y = true_error (log), one point
# style per policy; float rows left, double rows right. A schedule that keeps
# nothing (RevBackprop on a fully invertible net) is drawn at x = XFLOOR;
# a non-finite or larger-than-YCAP error at y = YCAP (top edge).
if (!exists("csv")) csv = 'bench/results/fidelity.csv'
if (!exists("out")) out = 'bench/results/fidelity_memory_vs_error.png'

XFLOOR = 1e-3
YCAP = 1e3
set datafile separator ","
set datafile missing ""

if (out[strlen(out)-3:] eq '.svg') {
  set terminal svg size 1400,620 dynamic font "Sans,11"
} else {
  set terminal png size 1400,620 font "Sans,10"
}
set output out

set logscale xy
set format x "10^{%L}"
set format y "10^{%L}"
set xlabel "residual bytes / backprop bytes"
set ylabel "true error (per-tensor max rel. vs double backprop)"
set grid
set key outside right top vertical spacing 1.1 title "policy"

policies = "backprop none every:4 every:16 tolerance double revbackprop"
pt(i) = word("1 6 2 4 7 5 9", i) + 0
lc(i) = word("black #1f77b4 #aec7e8 #17becf #d62728 #2ca02c #9467bd", i)

xval(pol) = (strcol(10) eq pol) ? ((column(15) > 0 && column(14) > 0) ? column(14) / column(15) : XFLOOR) : NaN
yval(pol) = (strcol(10) eq pol) ? ((valid(11) && column(11) < YCAP) ? column(11) : YCAP) : NaN
only(dtype, v) = (strcol(9) eq dtype) ? v : NaN

set multiplot layout 1,2 title "Moonwalk fidelity: memory vs gradient error (worst of seeds; width 64, batch 32)"
do for [dt in "float double"] {
  set title dt." networks"
  if (dt eq "float") { tol = 1e-4 } else { tol = 1e-10 }
  set yrange [*:YCAP*3]
  set arrow 1 from graph 0, first tol to graph 1, first tol nohead dashtype 2 lc rgb "#d62728"
  set label 1 sprintf("tolerance %.0e", tol) at graph 0.02, first tol*2 tc rgb "#d62728"
  plot for [i=1:words(policies)] csv every ::1 \
       using (only(dt, xval(word(policies, i)))):(only(dt, yval(word(policies, i)))) \
       with points pt pt(i) ps 1.2 lc rgb lc(i) title word(policies, i)
}
unset multiplot
