"""The hosts and what is known of them: hosts files, discovery, known hosts, preflight probes, caches and fit."""
