"""The paper's experiment end to end: the `reproduce` pipeline, online runs, figures and the report."""
