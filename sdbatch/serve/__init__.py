"""The service: an AUTOMATIC1111-compatible web API and a web page on Ray Serve.

`app` (deployments and the `build` application builder), `a1111_api` (request models, checks,
answers), `routes` (HTTP routes), `page` (the Gradio page), `cli` (`python -m sdbatch serve`).
"""
