"""Every route of the HTTP edge needs the bearer token, but the open set that docs/security.md
names; refused requests are counted 401 under their route. The routes come from the edge's own
table (rest.ROUTES, from which ``add_routes`` fills the app's router), as test_auth_coverage takes
gRPC methods from the handlers the server was given, so a route added or opened later cannot slip
through."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from digitserve.server.rest import ROUTES, RestApi, Route, add_routes
from digitserve.server.security import INVALID_TOKEN, MISSING_TOKEN
from tests.server.test_http import call, fp32_body, images_u8, scaled
from tests.servers import ServerThread
from tests.support import scrape

TOKEN = "route-t0ken"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"
VALUES = {"name": "tiny", "version": "1", "label": "stable"}


def documented_open_routes() -> set[str]:
    """``METHOD /path/{param}`` of each route the sentence of docs/security.md that ends "stay
    open" names (NAME and V written for the parameters)."""
    text = " ".join(DOCS.read_text().split())
    sentence = re.search(r"\(401 with the same messages;([^()]*?) stay open", text)
    assert sentence, "docs/security.md no longer says which HTTP routes stay open"
    named = re.findall(r"`([A-Z]+ /[^`]*)`", sentence.group(1))
    assert named, sentence.group(1)
    return {n.replace("NAME", "{name}").replace("/V/", "/{version}/") for n in named}


def concrete(route: Route) -> str:
    """A path the route matches: its parameters filled with the served model, version 1 (or its
    label)."""
    path = route.label
    for key, value in VALUES.items():
        path = path.replace("{" + key + "}", value)
    return path


def test_the_route_table_is_what_the_edge_dispatches() -> None:
    """Each route's path resolves, in the router add_routes fills, to that route (no earlier one
    shadows it), and names a handler of RestApi: the table the test walks is the one requests go
    through."""
    async def resolve() -> None:
        app = web.Application()
        add_routes(app, RestApi.__new__(RestApi))
        for route in ROUTES:
            found = await app.router.resolve(make_mocked_request(route.method, concrete(route)))
            assert found.http_exception is None, route.label
            resource = found.route.resource
            assert resource is not None and resource.canonical == route.label, route.label
            assert found.route.method == route.method and set(found) <= set(VALUES), route.label
            assert callable(getattr(RestApi, route.handler, None)), route.handler

    asyncio.run(resolve())


def test_every_route_but_the_documented_open_ones_needs_the_token(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    # Model control on, so that load and unload answer 200 with the token (unload comes last);
    # version 1 labelled, so that the routes naming a label answer 200 with it.
    config = tmp_path / "models.toml"
    config.write_text('default_model = "tiny"\n\n[models.tiny]\nlabels = { stable = 1 }\n')
    server = start_server(http_port=0, auth_token=TOKEN, model_control="explicit", model_config=config,
                          model_name=None)
    port = server.app.http_port
    assert port
    open_in_code = {f"{r.method} {r.label}" for r in ROUTES if r.open}
    assert open_in_code == documented_open_routes()
    body = fp32_body(scaled(images_u8(1)))
    v1_body = {"instances": images_u8(1).tolist()}  # TF Serving's predict
    answered_open: set[str] = set()
    for route in ROUTES:
        path, key = concrete(route), f"{route.method} {route.label}"
        payload = (v1_body if route.label.startswith("/v1/") else body) if route.method == "POST" else None
        missing = call(port, route.method, path, payload)
        if missing.status != 401:
            answered_open.add(key)
            assert route.open, (key, missing.status, missing.body)
            continue
        assert (missing.json, missing.headers["www-authenticate"]) == ({"error": MISSING_TOKEN}, "Bearer")
        wrong = call(port, route.method, path, payload, {"Authorization": "Bearer not-the-token"})
        assert (wrong.status, wrong.json) == (401, {"error": INVALID_TOKEN}), key
        good = call(port, route.method, path, payload, {"Authorization": f"Bearer {TOKEN}"})
        assert good.status == 200, (key, good.status, good.body)
    # Exactly the open routes answered without a token, and they answer it with their content.
    assert answered_open == open_in_code
    counted = {dict(labels)["route"]: value for (name, labels), value in scrape(port).items()
               if name == "http_server_requests_total" and dict(labels)["code"] == "401"}
    assert counted == {r.label: 2.0 for r in ROUTES if not r.open}  # missing and wrong token
