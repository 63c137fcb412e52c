"""Launching and supervising a job: the launch API, rank control, remote and elastic runs, events and results."""
