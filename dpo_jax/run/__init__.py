"""A training run from its config: the checks, the build, the compiled step and its loop,
checkpoints and exports, guards, preemption, many hosts, the logs and the one-line errors."""
