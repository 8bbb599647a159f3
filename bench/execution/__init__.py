"""Running cells: isolated worker processes, the fork server, executors, run folders and the environment."""
