"""`swarm api`: an OpenAI-compatible HTTP API over the client library.

    cli         the command: flags, loading the models, serving with uvicorn
    catalog     the models and adapters served, by the name a request gives
    schema      request bodies checked before any work, one error naming the parameter
    generation  one completion in a worker thread: sampling, stop strings, finish reason, usage
    responses   OpenAI's JSON shapes of answers and stream chunks
    errors      OpenAI's error shape, and the client library's failures as HTTP statuses
    app         the Starlette routes, streaming over SSE

Like every application in client/apps it uses the client library only, never peer/.
"""
