"""Per-VM jails: the identity, cgroup, namespaces, file view and system-call filter
of each VM's host processes."""
