"""Everything with side effects: the CLI, the console, executors and the in-job worker."""
