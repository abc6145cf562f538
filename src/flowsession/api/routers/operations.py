"""Long operations: poll one, or stream its events (server-sent events)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from flowsession.access.accounts import Principal
from flowsession.api.context import principal

router = APIRouter(tags=["operations"])


@router.get("/operations/{op_id}")
def get_operation(op_id: str, request: Request, who: Principal = Depends(principal)) -> dict:
    ops = request.app.state.operations
    return ops.get(op_id, owner=None if who.manages_all else who.user)


@router.get("/operations/{op_id}/events")
def operation_events(op_id: str, request: Request,
                     who: Principal = Depends(principal)) -> StreamingResponse:
    ops = request.app.state.operations
    ops.get(op_id, owner=None if who.manages_all else who.user)  # 404 before streaming

    async def gen():
        async for event in ops.stream(op_id):
            yield f"data: {json.dumps(event, default=str)}\n\n"
        yield "event: end\ndata: {}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")
