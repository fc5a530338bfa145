"""Ray cluster configuration: a local multi-node cluster for tests, the launcher config and runtime_env."""
