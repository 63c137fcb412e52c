"""Backend choice and Thunderbolt cable set-up: RDMA facts, the collective backend and tbsetup's plan."""
