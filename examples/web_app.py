"""A small media site on asyncassets and Starlette: upload, gallery, playback, download.

One command starts it on a throwaway local database server::

    pip install -e '.[examples]'
    python examples/web_app.py            # then open http://127.0.0.1:8000/

What it shows:

* an upload form whose validation errors (not an image, too big, no title) are
  shown beside the fields, all at once: ``ImageField`` and ``FileField`` rules
  check the file even when the title is missing, and a good file sent back for
  its title is named, to be chosen again (a browser keeps no file in a form);
* a gallery of thumbnails made by ``ImageField``, served by ``FileResponse``,
  which browsers revalidate with a 304 on the next visit;
* a video/audio page whose player seeks: ``FileResponse`` answers its Range
  requests, reading only those bytes;
* download links signed with ``proxy.url(download=True)``, served by
  ``files_app`` mounted at ``/files``;
* a large-upload page (``/large``) with a progress bar: tus-js-client through the
  app's ``tus_app`` into any storage, or Uppy's ``@uppy/aws-s3`` straight to the
  bucket through ``direct_uploads_app`` when the uploads' storage is S3; both
  resume after a page reload. Its script is ``examples/web/src/uploads.js``,
  bundled with its npm packages by ``npm ci && npm run build`` in ``examples/web``.

``create_app(uri)`` builds the app for any MongoDB URI (the tests run it under
uvicorn and drive it with a real browser).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

try:
    import PIL  # noqa: F401  (ImageField's thumbnails)
    import starlette  # noqa: F401
except ImportError as missing:  # say what to install, not a traceback
    sys.exit(
        f"examples/web_app.py needs {missing.name}: pip install -e '.[examples]' "
        "(Starlette, uvicorn, Pillow and the embedded server)"
    )

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import (
    FileResponse as StaticFile,
)
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route

import asyncassets
from asyncassets import Document, DoesNotExist, FileValidationError, ValidationError
from asyncassets.fields import FileField, ImageField, StringField
from asyncassets.storage import Storage
from asyncassets.web import FileResponse, UploadTarget, files_app, tus_app
from asyncassets.web.direct import DirectUploadIntent, direct_uploads_app

MIB = 1024 * 1024


class Photo(Document):
    title = StringField(required=True, max_length=80)
    image = ImageField(
        size=(1600, 1600, False),
        thumbnail_size=(240, 180, True),
        max_size=20 * MIB,
        collection_name="example_images",
    )
    meta = {"collection": "example_photos"}


class Clip(Document):
    title = StringField(required=True, max_length=80)
    media = FileField(
        collection_name="example_media",
        max_size=200 * MIB,
        allowed_content_types=["video/*", "audio/*"],
    )
    meta = {"collection": "example_clips"}


#: The bundle of examples/web/src/uploads.js (``npm run build`` in examples/web).
UPLOADS_SCRIPT = Path(__file__).parent / "web" / "build" / "uploads.js"
#: tus-js-client's chunk: a reload re-sends at most this much.
TUS_CHUNK = 4 * MIB


def large_upload_document(storage: Storage | None) -> type[Document]:
    """The document class of the large-upload page, its file in ``storage``."""
    kind = storage.kind if storage is not None else "gridfs"

    class LargeUpload(Document):
        title = StringField(max_length=80)
        file = FileField(storage=storage, max_size=4096 * MIB,
                         collection_name=None if storage else "example_large")
        meta = {"collection": f"example_large_{kind}"}

    return LargeUpload


LARGE_PAGE = """
<form id='large-form' onsubmit='return false'>
<label>Title <input id='title' value='A large file'></label>
<label>File <input type='file' id='file'></label>
<button id='tus' type='button'>Upload (resumable, through the app)</button>
{direct}
<p><progress id='progress' max='1' value='0' style='width: 100%'></progress></p>
<p id='status'>Choose a file.</p></form>
<script src='/static/uploads.js'></script>
<script>
const config = {config};
const status = document.getElementById('status');
const bar = document.getElementById('progress');
const stopAt = Number(new URLSearchParams(location.search).get('stop') || 0);
window.uploadState = {{progress: 0, done: false, error: null, resumedAt: null}};
async function target() {{
  const title = document.getElementById('title').value;
  const body = JSON.stringify({{title}});
  const r = await fetch('/large/new', {{method: 'POST', body}});
  return (await r.json()).id;
}}
function run(kind) {{
  const file = document.getElementById('file').files[0];
  if (!file) {{ status.textContent = 'Choose a file first.'; return; }}
  const state = window.uploadState;
  let handle;
  const options = {{
    onProgress(sent, total) {{
      if (state.resumedAt === null) state.resumedAt = sent;
      state.progress = sent / total;
      bar.value = state.progress;
      status.textContent = `${{sent}} of ${{total}} bytes`;
      if (stopAt && state.progress >= stopAt && !state.stopped) {{
        state.stopped = true;  // the tests' "page closed mid-upload"
        handle.abort();
      }}
    }},
    onSuccess(result) {{
      state.done = true; state.result = result || null;
      bar.value = 1; status.textContent = 'Done.';
    }},
    onError(error) {{
      state.error = String(error); status.textContent = state.error;
    }},
  }};
  const memory = `large:${{kind}}:${{file.name}}:${{file.size}}:${{file.lastModified}}`;
  const start = async () => {{
    let id = localStorage.getItem(memory);
    if (!id) {{ id = await target(); localStorage.setItem(memory, id); }}
    state.document = id;
    if (kind === 'tus') {{
      handle = AssetUploads.tusUpload(file, {{endpoint: '/uploads/tus/',
        chunkSize: config.tusChunk, metadata: {{document: id}}, ...options}});
    }} else {{
      handle = AssetUploads.directUpload(file, {{endpoint: '/uploads/s3',
        partSize: config.partSize, target: {{id}}, ...options}});
    }}
    state.resumed = await handle.start();
  }};
  start().catch((error) => options.onError(error));
}}
document.getElementById('tus').onclick = () => run('tus');
const direct = document.getElementById('direct');
if (direct) direct.onclick = () => run('direct');
</script>
"""


# -- pages -------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
body { background: #fafafa; }
header { background: #234; color: #fff; padding: 10px 24px; }
header a { color: #fff; margin-right: 18px; text-decoration: none; }
main { padding: 16px 24px; max-width: 900px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; padding: 6px; width: 240px; }
.card img { display: block; width: 240px; height: 180px; }
form { background: #fff; border: 1px solid #ddd; padding: 12px; margin-bottom: 16px; }
label { display: block; margin: 6px 0; }
.error { color: #b00020; font-weight: 600; }
a.button { background: #234; color: #fff; padding: 6px 12px; text-decoration: none; }
"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title>"
    return HTMLResponse(
        f"<!doctype html><html><head>{head}<style>{STYLE}</style></head><body>"
        "<header><a href='/'>Gallery</a><a href='/upload'>Upload</a>"
        "<a href='/large'>Large upload</a></header>"
        f"<main><h1>{html.escape(title)}</h1>{body}</main></body></html>",
        status_code=status,
    )


def upload_form(
    errors: dict[str, str] | None = None, values: dict[str, str] | None = None
) -> str:
    errors, values = errors or {}, values or {}

    def error(name: str) -> str:
        message = errors.get(name)
        if not message:
            return ""
        return f"<div class='error' id='{name}-error'>{html.escape(message)}</div>"

    def form(kind: str, what: str, accept: str) -> str:
        title = html.escape(values.get(f"{kind}_title", ""))
        return (
            "<form method='post' action='/upload' enctype='multipart/form-data' "
            f"id='{kind}-form'><h2>{what}</h2>"
            f"<input type='hidden' name='kind' value='{kind}'>"
            f"<label>Title <input name='title' value='{title}'></label>"
            f"{error(f'{kind}_title')}"
            f"<label>File <input type='file' name='file' accept='{accept}'></label>"
            f"{error(f'{kind}_file')}<button type='submit'>Upload</button></form>"
        )

    return form("photo", "A photo", "image/*") + form(
        "clip", "A video or audio clip", "video/*,audio/*"
    )


async def gallery(request: Request) -> Response:
    photos = await Photo.objects.order_by("-id").load_files("image").to_list()
    clips = await Clip.objects.order_by("-id").load_files("media").to_list()
    cards = "".join(
        f"<div class='card'><a href='/photos/{p.pk}'>"
        f"<img src='/photos/{p.pk}/thumbnail' alt='{html.escape(p.title)}' "
        f"width='240' height='180'></a>{html.escape(p.title)}</div>"
        for p in photos
    )
    listing = "".join(
        f"<li><a href='/clips/{c.pk}'>{html.escape(c.title)}</a> "
        f"({html.escape(c.media.content_type or '?')}, {c.media.length:,} bytes)</li>"
        for c in clips
    )
    body = (
        f"<h2>Photos</h2><div class='grid'>{cards or 'No photo yet.'}</div>"
        f"<h2>Clips</h2><ul>{listing or '<li>No clip yet.</li>'}</ul>"
    )
    return page("Gallery", body)


async def upload(request: Request) -> Response:
    if request.method == "GET":
        return page("Upload", upload_form())
    async with request.form(max_files=1, max_fields=10) as form:
        kind = str(form.get("kind", "photo"))
        title = str(form.get("title", "")).strip()
        file = form.get("file")
        errors: dict[str, str] = {}
        if not title:
            errors[f"{kind}_title"] = "Give it a title."
        if not isinstance(file, UploadFile) or not file.filename:
            errors[f"{kind}_file"] = "Choose a file."
        else:
            # The file is checked even without a title: every error shows at once.
            doc: Any = Photo(title=title) if kind == "photo" else Clip(title=title)
            proxy = doc.image if kind == "photo" else doc.media
            try:
                # FileField reads the upload in pieces; ImageField checks the image.
                await proxy.put(
                    file, content_type=file.content_type, filename=file.filename
                )
            except FileValidationError as exc:
                errors[f"{kind}_file"] = str(exc).split(": ", 1)[-1]
            else:
                if errors:
                    # Good, but the form goes back for its title, and a browser
                    # keeps no file in a form it shows again: name it, to choose.
                    await proxy.delete()
                    errors[f"{kind}_file"] = (
                        f"{file.filename} is fine: choose it again with the title."
                    )
                else:
                    await doc.save()
    if errors:
        values = {f"{kind}_title": title}
        return page("Upload", upload_form(errors, values), status=400)
    target = f"/photos/{doc.pk}" if kind == "photo" else f"/clips/{doc.pk}"
    return RedirectResponse(target, status_code=303)


async def photo_page(request: Request) -> Response:
    photo = await Photo.objects.get(pk=request.path_params["pk"])
    await photo.image.load()
    download = await photo.image.url(expires=3600, download=True)
    body = (
        f"<p><img src='/photos/{photo.pk}/image' alt='{html.escape(photo.title)}' "
        f"style='max-width: 100%'></p><p>{photo.image.width} x {photo.image.height} "
        f"{html.escape(photo.image.format or '')}, {photo.image.length:,} bytes. "
        f"<a class='button' id='download' href='{html.escape(download or '')}'>"
        "Download</a> (a signed link, valid for an hour)</p>"
    )
    return page(photo.title, body)


async def clip_page(request: Request) -> Response:
    clip = await Clip.objects.get(pk=request.path_params["pk"])
    await clip.media.load()
    tag = "audio" if (clip.media.content_type or "").startswith("audio/") else "video"
    download = await clip.media.url(expires=3600, download=True)
    body = (
        f"<{tag} id='player' controls preload='metadata' "
        f"src='/clips/{clip.pk}/media' style='width: 100%'></{tag}>"
        f"<p>{html.escape(clip.media.content_type or '')}, "
        f"{clip.media.length:,} bytes. "
        f"<a class='button' id='download' href='{html.escape(download or '')}'>"
        "Download</a> (a signed link, valid for an hour)</p>"
    )
    return page(clip.title, body)


# -- files -------------------------------------------------------------------------


async def photo_image(request: Request) -> Response:
    photo = await Photo.objects.get(pk=request.path_params["pk"])
    return FileResponse(photo.image, request)


async def photo_thumbnail(request: Request) -> Response:
    photo = await Photo.objects.get(pk=request.path_params["pk"])
    await photo.image.load()  # the thumbnail's id is in the image's metadata
    if photo.image.thumbnail is None:
        return Response("no thumbnail", status_code=404)
    return FileResponse(photo.image.thumbnail, request)


async def clip_media(request: Request) -> Response:
    clip = await Clip.objects.get(pk=request.path_params["pk"])
    return FileResponse(clip.media, request)


def large_routes(storage: Storage | None) -> list[Any]:
    """The large-upload page, its endpoints, and the upload apps it talks to."""
    cls = large_upload_document(storage)
    direct = storage is not None and storage.kind == "s3"

    async def large_page(request: Request) -> Response:
        config = {"tusChunk": TUS_CHUNK,
                  "partSize": getattr(storage, "part_size", 0)}
        button = ("<button id='direct' type='button'>Upload straight to S3</button>"
                  if direct else "")
        return page("Large upload", LARGE_PAGE.format(
            config=json.dumps(config), direct=button))

    async def new_upload(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        doc = cls(title=str(body.get("title") or "untitled")[:80])
        await doc.save()
        return JSONResponse({"id": str(doc.pk)})

    async def large_file(request: Request) -> Response:
        doc = await cls.objects.get(pk=request.path_params["pk"])
        return FileResponse(doc.file, request, download=True)

    # This demo has no users: any visitor may upload into any upload document
    # (ids are ObjectIds, which can be guessed). An app with users looks the
    # document up with the requester's rights here, and checks the requester on
    # every later tus request too (upload.info), as docs/uploads.rst shows.
    async def authorize_tus(request: Request, upload: Any) -> Any:
        if upload.id is not None:
            return True  # demo: the upload's URL is its capability
        doc = await cls.objects(pk=upload.metadata.get("document")).first()
        return None if doc is None else UploadTarget(doc, "file")

    async def authorize_direct(request: Request, intent: DirectUploadIntent) -> Any:
        doc = await cls.objects(pk=intent.target.get("id")).first()
        return None if doc is None else (doc, "file")

    async def script(request: Request) -> Response:
        if not UPLOADS_SCRIPT.exists():
            return Response("run `npm ci && npm run build` in examples/web",
                            status_code=404)
        return StaticFile(UPLOADS_SCRIPT, media_type="text/javascript")

    routes: list[Any] = [
        Route("/large", large_page),
        Route("/large/new", new_upload, methods=["POST"]),
        Route("/large/{pk}/file", large_file, methods=["GET", "HEAD"]),
        Route("/static/uploads.js", script),
        Mount("/uploads/tus", tus_app(authorize_tus)),
    ]
    if direct:
        routes.append(Mount("/uploads/s3", direct_uploads_app(authorize_direct)))
    return routes


async def not_found(request: Request, exc: Exception) -> Response:
    return page("Not found", "<p>There is nothing here.</p>", status=404)


def create_app(
    uri: str, *, secret: str | None = None, large_storage: Storage | None = None
) -> Starlette:
    """The app, on the MongoDB database named in ``uri`` (connected at start-up).

    :param secret: the key signing download links; a random one by default (links
        then stop working when the process restarts).
    :param large_storage: where the large-upload page stores files (GridFS by
        default); an ``S3Storage`` adds the direct-to-S3 upload.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        try:
            yield
        finally:
            await asyncassets.disconnect()

    return Starlette(
        routes=[
            Route("/", gallery),
            Route("/upload", upload, methods=["GET", "POST"]),
            Route("/photos/{pk}", photo_page),
            Route("/photos/{pk}/image", photo_image, methods=["GET", "HEAD"]),
            Route("/photos/{pk}/thumbnail", photo_thumbnail, methods=["GET", "HEAD"]),
            Route("/clips/{pk}", clip_page),
            Route("/clips/{pk}/media", clip_media, methods=["GET", "HEAD"]),
            Mount("/files", files_app(secret=secret or secrets.token_urlsafe(32))),
            *large_routes(large_storage),
        ],
        exception_handlers={
            404: not_found, DoesNotExist: not_found, ValidationError: not_found
        },
        lifespan=lifespan,
    )


def main() -> None:
    import argparse

    import uvicorn

    from asyncassets.embedded import EmbeddedServer

    parser = argparse.ArgumentParser(
        description="A small media site on an in-memory embedded server: uploads, "
        "a gallery, signed downloads. Everything is gone when it stops."
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8000")),
        help="the port on 127.0.0.1 (default: $PORT, else 8000)",
    )  # fmt: skip
    port = parser.parse_args().port
    with EmbeddedServer() as server:  # in memory: everything is gone when it stops
        print(f"database: {server.kind} at {server.uri} (in memory)")
        print(f"open http://127.0.0.1:{port}/  (Ctrl-C stops it)")
        uvicorn.run(create_app(server.uri + "media_site"), host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
