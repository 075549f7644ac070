"""The HTTP floor: a bare ASGI app (Starlette under uvicorn) whose endpoint reads the body and answers
a small JSON, so a load test against it measures what HTTP alone costs on this machine.

    uvicorn bench.floor_app:app --port 8000
"""
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


async def noop(request):
    body = await request.body()
    return JSONResponse({"bytes": len(body)})


async def ready(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/noop", noop, methods=["POST"]), Route("/readyz", ready)])
