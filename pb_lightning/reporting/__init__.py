"""Run history rows and files, the final report, and the plot of a run."""
