"""SSH hosts (agentless GPU boxes): credential vault, remote command building, probe parsing, adapters."""
