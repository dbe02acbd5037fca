"""A Hugging-Face-like file server on 127.0.0.1 for download tests (test_prepare, test_gpt2).

    server = FileServer({'a.bin': b'...'}, prefix='/kjj0/finewebedu10B-gpt2/resolve/main/')
    lab.download.fetch(server.url + '/kjj0/finewebedu10B-gpt2/resolve/main/a.bin', ...)
    server.gets('a.bin')  # -> [('a.bin', None), ('a.bin', 'bytes=65536-')]: every GET and its Range
    server.close()

It honours Range (206, or 416 past the end) and misbehaves when told to, once per file: answer 503
(fail_once), send half the body and cut the connection (drop_once); or every time: answer 503
(fail_always), ignore Range and send the whole file with 200 (ignore_range), as some servers do.
"""
import http.server
import socket
import threading


class FileServer:
    """Serves files[key] at URL path prefix + key; anything else is a 404.

    files: key -> bytes, where a key is a file name under a prefix such as '/org/repo/resolve/main/'
    or, with the default prefix '/', a whole path 'org/repo/resolve/main/name'.
    """

    def __init__(self, files, prefix='/'):
        self.files = dict(files)
        self.prefix = prefix
        self.log = []             # (key, Range header or None) for every GET; key = the full path outside prefix
        self.fail_once = set()    # keys to answer 503 once
        self.fail_always = set()  # keys to answer 503 every time
        self.drop_once = set()    # keys to send half of, then close the connection, once
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split('?')[0]
                key = path.removeprefix(server.prefix) if path.startswith(server.prefix) else path
                rng = self.headers.get('Range')
                server.log.append((key, rng))
                if key in server.fail_once or key in server.fail_always:
                    server.fail_once.discard(key)
                    return self.send_error(503)
                if key not in server.files or not path.startswith(server.prefix):
                    return self.send_error(404)
                body, start = server.files[key], 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix('bytes=').split('-')[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header('Content-Range', f'bytes */{len(body)}')
                        self.send_header('Content-Length', '0')
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
                else:
                    self.send_response(200)
                self.send_header('Content-Length', str(len(body) - start))
                self.end_headers()
                if key in server.drop_once:
                    server.drop_once.discard(key)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def gets(self, key=None):
        """The logged GETs, all or those of one key."""
        return [r for r in self.log if key is None or r[0] == key]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
