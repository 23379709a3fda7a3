"""What the step costs: benchmarks run on this machine (functions returning dicts that the
scripts print and save), and `planner`, the step compiled for a topology it does not run on."""
