"""Plan a deployment: which configuration meets a latency target at the accuracy needed on a link
(`planner`), from a cost model measured on this machine (`costmodel`), and how many edges one cloud replica
carries (`capacity`); `validate` checks the predictions against a run's online measurements."""
