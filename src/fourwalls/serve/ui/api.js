// The page's only way to the server: fourwalls' public HTTP API, with the API key (if any) as a Bearer token.

export class ApiError extends Error {
  /** status 0: the server could not be reached (or went away). */
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not the API's error object (a proxy's page): keep the status line
  }
  return new ApiError(response.status, message);
}

export class Api {
  constructor(key = null) {
    this.key = key;
  }

  headers(json = false) {
    const headers = {};
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    if (json) headers["Content-Type"] = "application/json";
    return headers;
  }

  /** The response of a request that succeeded, or an ApiError with the server's message. */
  async request(method, path, body = undefined, signal = undefined) {
    let response;
    try {
      response = await fetch(path, {
        method, signal, headers: this.headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      if (signal?.aborted) throw e;
      throw new ApiError(0, `cannot reach the server (${e.message})`);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async json(method, path, body = undefined) {
    return (await this.request(method, path, body)).json();
  }

  async text(path) {
    return (await this.request("GET", path)).text();
  }

  /** The events of a server-sent event stream (OpenAI's streaming format), parsed, until [DONE]. A stream that
   * ends without [DONE] (the server went away) throws. */
  async *stream(path, body, signal) {
    const response = await this.request("POST", path, body, signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (e) {
          if (signal.aborted) throw e;
          throw new ApiError(0, `the connection to the server was lost (${e.message})`);
        }
        if (chunk.done) throw new ApiError(0, "the server closed the stream before the answer was complete");
        buffer += chunk.value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") return;
            yield JSON.parse(data);
          }
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /** POST JSON with upload progress (fetch cannot report it): `progress(fraction)` as the body goes out. */
  upload(path, body, progress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      for (const [name, value] of Object.entries(this.headers(true))) xhr.setRequestHeader(name, value);
      xhr.upload.onprogress = (e) => e.lengthComputable && progress(e.loaded / e.total);
      xhr.onerror = () => reject(new ApiError(0, "the upload was cut off (the server closed the connection)"));
      xhr.onload = () => {
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch {
          // not JSON: reported by status below
        }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(new ApiError(xhr.status, body?.error?.message ?? `${xhr.status} ${xhr.statusText}`));
      };
      xhr.send(JSON.stringify(body));
    });
  }
}
