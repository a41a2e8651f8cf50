"""MLflow policy above the core: tracking helpers, the champion rule, and the command-line runner that
turns user errors (MLflow's "not found" included) into one line. `emunet.core` knows nothing of MLflow."""
