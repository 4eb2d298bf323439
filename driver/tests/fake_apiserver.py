#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server, for the `--watch-volume-attributes` tests.

Serves, over plain HTTP on 127.0.0.1, what the node plugin reads and writes:
  GET COLLECTION                 a list of DIR/KIND/*.json
  GET COLLECTION?watch=...       watch events: every file of DIR/KIND that appears or
                                 changes after the watch is logged (polled every 50 ms)
  PATCH COLLECTION/NAME          a JSON merge patch of DIR/KIND/NAME.json
  GET /apis/storage.k8s.io/v1/volumeattributesclasses/NAME   DIR/vacs/NAME.json, or 404
where the collections are PersistentVolumes (DIR/pvs), VolumeSnapshotContents (DIR/vscs)
and VolumeGroupSnapshotContents (DIR/vgscs). Anything else is 405. Every request line (and
a PATCH's body) is appended to DIR/requests.log, a watch's once it is watching. The port
it listens on is written to DIR/port once it listens.

usage: fake_apiserver.py DIR
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ROOT = sys.argv[1]
LOCK = threading.Lock()
VERSION = [1]
# collection path: (directory, apiVersion, kind)
COLLECTIONS = {
    "/api/v1/persistentvolumes": ("pvs", "v1", "PersistentVolume"),
    "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents":
        ("vscs", "snapshot.storage.k8s.io/v1", "VolumeSnapshotContent"),
    "/apis/groupsnapshot.storage.k8s.io/v1beta2/volumegroupsnapshotcontents":
        ("vgscs", "groupsnapshot.storage.k8s.io/v1beta2", "VolumeGroupSnapshotContent"),
}


def log(line):
    with LOCK, open(os.path.join(ROOT, "requests.log"), "a") as f:
        f.write(line + "\n")


def objects(sub):
    """{file name: (mtime_ns, object)} of DIR/SUB."""
    out = {}
    d = os.path.join(ROOT, sub)
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(d, name)
        try:
            with open(path) as f:
                obj = json.load(f)
            out[name] = (os.stat(path).st_mtime_ns, obj)
        except (OSError, ValueError):
            pass  # being written: the next poll sees it whole
    return out


def versioned(obj, api_version, kind):
    with LOCK:
        VERSION[0] += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(VERSION[0])
    obj["apiVersion"] = api_version
    obj["kind"] = kind
    return obj


def merge(target, patch):
    """RFC 7386."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = v


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        collection = COLLECTIONS.get(url.path)
        if collection and query.get("watch", ["false"])[0] in ("true", "1"):
            # Logged by the watch, once it is watching.
            return self.watch(*collection, float(query.get("timeoutSeconds", ["30"])[0]))
        log(f"GET {self.path}")
        if collection:
            sub, api_version, kind = collection
            items = [versioned(obj, api_version, kind) for _, obj in objects(sub).values()]
            with LOCK:
                version = str(VERSION[0])
            return self.reply(200, {
                "apiVersion": api_version,
                "kind": kind + "List",
                "metadata": {"resourceVersion": version},
                "items": items,
            })
        prefix = "/apis/storage.k8s.io/v1/volumeattributesclasses/"
        if url.path.startswith(prefix):
            name = url.path[len(prefix):]
            path = os.path.join(ROOT, "vacs", name + ".json")
            if "/" not in name and os.path.exists(path):
                with open(path) as f:
                    vac = json.load(f)
                vac.update(apiVersion="storage.k8s.io/v1", kind="VolumeAttributesClass")
                vac.setdefault("metadata", {})["name"] = name
                return self.reply(200, vac)
            return self.reply(404, {
                "apiVersion": "v1", "kind": "Status", "status": "Failure",
                "reason": "NotFound", "code": 404,
                "message": f'volumeattributesclasses.storage.k8s.io "{name}" not found',
            })
        self.reply(405, {"kind": "Status", "code": 405, "message": "not served here"})

    def do_PATCH(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        log(f"PATCH {self.path} {body.decode()}")
        collection, _, name = urlparse(self.path).path.rpartition("/")
        if collection not in COLLECTIONS or "/" in name or not name:
            return self.reply(405, {"kind": "Status", "code": 405, "message": "not served"})
        sub, api_version, kind = COLLECTIONS[collection]
        path = os.path.join(ROOT, sub, name + ".json")
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return self.reply(415, {"kind": "Status", "code": 415, "message": "merge patches only"})
        with LOCK:
            if not os.path.exists(path):
                return self.reply(404, {"kind": "Status", "code": 404, "message": "not found"})
            with open(path) as f:
                obj = json.load(f)
            merge(obj, json.loads(body))
            with open(path + ".tmp", "w") as f:
                json.dump(obj, f)
            os.rename(path + ".tmp", path)
        self.reply(200, versioned(obj, api_version, kind))

    def do_POST(self):
        log(f"POST {self.path}")
        self.reply(405, {"kind": "Status", "code": 405, "message": "read only"})

    do_PUT = do_DELETE = do_POST

    def watch(self, sub, api_version, kind, timeout):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        seen = {name: mtime for name, (mtime, _) in objects(sub).items()}
        # Logged once the watch sees every later change: a test that waits for this line
        # and then writes an object gets its event (it has no resourceVersion to replay).
        log(f"GET {self.path}")
        end = time.monotonic() + min(timeout, 30)
        try:
            while time.monotonic() < end:
                time.sleep(0.05)
                for name, (mtime, obj) in objects(sub).items():
                    if seen.get(name) != mtime:
                        event = "ADDED" if name not in seen else "MODIFIED"
                        seen[name] = mtime
                        self.chunk({"type": event, "object": versioned(obj, api_version, kind)})
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


def main():
    for sub in ("pvs", "vacs", "vscs", "vgscs"):
        os.makedirs(os.path.join(ROOT, sub), exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(os.path.join(ROOT, "port.tmp"), "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(os.path.join(ROOT, "port.tmp"), os.path.join(ROOT, "port"))
    server.serve_forever()


if __name__ == "__main__":
    main()
