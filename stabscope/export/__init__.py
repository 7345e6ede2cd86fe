"""Exporting a recorded run to the dashboards people already watch, from the run store alone
(no torch): ``series.py`` chooses the few series worth a dashboard, ``tensorboard.py`` writes
them, the findings and the heatmaps as TensorBoard event files."""
