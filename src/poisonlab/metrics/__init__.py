"""Backdoor metrics, one module each."""
