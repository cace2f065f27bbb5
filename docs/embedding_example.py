"""A shop's Flask backend with openim-bizplugin mounted under /biz (docs/embedding.md).

Run it with the plugin's config named by BIZPLUGIN_CONFIG, for example:

    BIZPLUGIN_CONFIG=bizplugin.toml gunicorn --workers 2 --bind 127.0.0.1:8000 embedding_example:app
"""

from __future__ import annotations

import logging

from flask import Flask, request

from openim_bizplugin.errors import BizError
from openim_bizplugin.web import BizPlugin

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")

app = Flask(__name__)
biz = BizPlugin(app, url_prefix="/biz")  # config: the file BIZPLUGIN_CONFIG names


@app.get("/")
def home():
    return {"service": "shop", "version": 3}


@app.post("/orders/<order_id>/status")
def order_status_changed(order_id: str):
    """The shop's own endpoint: the buyer's app hears of it through OpenIM, sent in process."""
    change = request.get_json()
    try:
        answer = biz.send("order.status_changed", 1,
                          {"order_id": order_id, "status": change["status"], "updated_at": change["at"]},
                          users=[change["buyer"]], client="shop",
                          idempotency_key=f"order-{order_id}-{change['status']}")
    except BizError as exc:  # refused: the same status, detail and errors the HTTP API would answer
        return {"error": exc.detail, "errors": [e.as_dict() for e in exc.errors]}, exc.status
    return {"order_id": order_id, "notification": answer["id"]}, 201


@app.get("/notifications/<message_id>")
def notification(message_id: str):
    try:
        return biz.status(message_id)
    except BizError as exc:
        return {"error": exc.detail}, exc.status


@app.errorhandler(404)
def page_not_found(error):
    return "<h1>Shop</h1><p>There is no such page.</p>", 404
