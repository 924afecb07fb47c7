"""Development tools of this repository (``make demo``, the benchmarks' process plumbing).

Not part of the installed package: nothing under ``airflow_provider_pepipost`` imports it.
"""
