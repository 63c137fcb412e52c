"""Helpers for the CLI lab tests: rank scripts that users could write, and a way to drive `macrun`."""
