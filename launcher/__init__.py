"""macrun's driver side: hosts, SSH, preflight, sync, rendezvous and job control."""

from launcher.transport.deferred import defer_invoke

defer_invoke()
