"""macrun's driver side: hosts, SSH, preflight, sync, rendezvous and job control."""
