"""The OpenAI-compatible HTTP server (`dsmath serve`), vLLM's entrypoints/openai layout:

- protocol.py           request / response schemas (pydantic), request -> SamplingParams
- serving_engine.py     what the handlers share: errors, adding requests, disconnects, merged streams, SSE
- serving_completion.py POST /v1/completions
- serving_chat.py       POST /v1/chat/completions
- metrics.py            GET /metrics (Prometheus text)
- api_server.py         the app: GenerationRoutes (a lean ASGI route for the two generation endpoints) in front
                        of FastAPI (the rest); uvicorn with graceful shutdown
- cli.py                `dsmath serve` (argparse -> AsyncLLM with the LLM in an engine process -> app)

The handlers talk only to model.engine.AsyncLLM. Importing this package imports no web framework; fastapi and
uvicorn (the `serve` extra) are imported by api_server.py only.
"""
