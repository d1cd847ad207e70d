"""Ray jobs over prompt tables and image folders, one module per job kind (`generate`,
`metrics`), over shared planning (`plan`), output recording (`output`) and Ray helpers (`common`).
The command line is `python -m sdbatch.jobs` (`cli`)."""
