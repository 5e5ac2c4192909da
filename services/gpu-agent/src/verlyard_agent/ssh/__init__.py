"""The SSH runner: agentless hosts driven from the control plane over SSH (docs/adr/0011-ssh-hosts.md)."""
