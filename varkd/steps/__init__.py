"""The workflow's steps: one function per `varkd <command>` (varkd.cli), each running one job config on a device.

A step reads its inputs, calls the library modules of varkd and writes its outputs; no library module imports a
step, and nothing imports varkd.cli.
"""
