// imagestore's upload page: a progress bar, and a resumable upload through the tus
// endpoint where the server and the browser have it (tus-js-client, vendored), else one
// XMLHttpRequest to the form's own action. Without script the form posts as it is.
"use strict";

(function () {
  const PIECE = 64 * 1024 * 1024; // bytes a tus PATCH sends; a broken one is sent again
  const FIELDS = ["name", "namespace", "file"];

  function el(id) {
    return document.getElementById(id);
  }

  function mib(bytes) {
    return (bytes / (1024 * 1024)).toFixed(1) + " MiB";
  }

  function status(text) {
    el("upload-status").textContent = text;
  }

  function clearErrors() {
    FIELDS.forEach(function (field) {
      const error = el(field + "-error");
      error.textContent = "";
      error.hidden = true;
      el(field).removeAttribute("aria-invalid");
    });
  }

  // The API's error bodies: {"field": ["message", ...]} or {"message": "..."}.
  function showErrors(body, fallback) {
    let shown = false;
    let first = null;
    FIELDS.forEach(function (field) {
      if (body && Array.isArray(body[field])) {
        const error = el(field + "-error");
        error.textContent = body[field].join(" ");
        error.hidden = false;
        el(field).setAttribute("aria-invalid", "true");
        first = first || el(field);
        shown = true;
      }
    });
    const message = body && body.message ? body.message : fallback;
    status(shown ? "The image was not stored: " + describe(body) : "The image was not stored: " + message);
    if (first) {
      first.focus();
    }
  }

  function describe(body) {
    return FIELDS.filter(function (field) { return body[field]; })
      .map(function (field) { return body[field].join(" "); }).join(" ");
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch (error) {
      return null;
    }
  }

  function progress(sent, total) {
    const bar = el("upload-bar");
    bar.max = total || 1;
    bar.value = sent;
    el("upload-numbers").textContent = mib(sent) + " of " + mib(total) +
      " (" + Math.floor(100 * sent / (total || 1)) + "%)";
    if (total && sent >= total) {
      status("Sent: the server is checking the image…");
    }
  }

  function begin(form) {
    clearErrors();
    el("upload-progress").hidden = false;
    el("upload-button").disabled = true;
    progress(0, el("file").files[0].size);
    status("Uploading…");
  }

  function finish() {
    el("upload-button").disabled = false;
  }

  // One POST of the whole form, as without script, answered in JSON.
  function uploadWithXhr(form) {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable) {
        progress(event.loaded, event.total);
      }
    });
    xhr.addEventListener("load", function () {
      const body = parse(xhr.responseText);
      if (xhr.status === 201 && body && body.location) {
        window.location.assign(body.location);
      } else if (body === null) {
        window.location.assign(xhr.responseURL); // e.g. signed out meanwhile: that page
      } else {
        finish();
        showErrors(body, "the server answered " + xhr.status);
      }
    });
    xhr.addEventListener("error", function () {
      finish();
      status("The upload broke off (the connection failed): try again.");
    });
    xhr.send(new FormData(form));
  }

  // The tus protocol: pieces of PIECE bytes, retried after a broken connection, and
  // resumed from where it stopped when the same file is chosen again after a reload.
  function uploadWithTus(form, file) {
    const name = el("name").value;
    const namespace = el("namespace").value.trim();
    const metadata = {name: name};
    if (namespace) {
      metadata.namespace = namespace;
    }
    let imageLocation = null;
    const upload = new window.tus.Upload(file, {
      endpoint: form.dataset.tusEndpoint,
      headers: {Authorization: "Bearer " + form.dataset.token},
      metadata: metadata,
      chunkSize: PIECE,
      retryDelays: [0, 1000, 3000, 5000, 10000, 20000],
      removeFingerprintOnSuccess: true,
      // The same file under another name or namespace is another upload.
      fingerprint: function (f) {
        return Promise.resolve(["imagestore", f.name, f.size, f.lastModified, name, namespace].join("/"));
      },
      onProgress: progress,
      onAfterResponse: function (request, response) {
        imageLocation = response.getHeader("Image-Location") || imageLocation;
      },
      onSuccess: function () {
        const id = imageLocation && imageLocation.match(/\/images\/(\d+)$/);
        window.location.assign(id ? form.dataset.imagePage + id[1] + "?stored=1"
          : form.dataset.imagePage.replace(/images\/$/, ""));
      },
      onError: function (error) {
        finish();
        const response = error.originalResponse;
        const body = response ? parse(response.getBody()) : null;
        showErrors(body, response ? "the server answered " + response.getStatus() : error.message);
      },
    });
    upload.findPreviousUploads().then(function (previous) {
      if (previous.length) {
        upload.resumeFromPreviousUpload(previous[0]);
        status("Resuming an upload of this file that was cut off…");
      }
      upload.start();
    });
  }

  // Whether the server speaks tus 1.0 at the endpoint (OPTIONS needs no token).
  function tusAvailable(endpoint) {
    if (!(window.tus && window.tus.isSupported && window.fetch)) {
      return Promise.resolve(false);
    }
    return fetch(endpoint, {method: "OPTIONS"}).then(function (response) {
      const versions = response.headers.get("Tus-Version") || "";
      return response.ok && versions.split(",").map(function (v) { return v.trim(); }).includes("1.0.0");
    }, function () { return false; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = el("upload-form");
    if (!form || !window.FormData || !window.XMLHttpRequest) {
      return;
    }
    form.addEventListener("submit", function (event) {
      const file = el("file").files[0];
      if (!file) {
        return; // the browser's own check says the file is required
      }
      event.preventDefault();
      begin(form);
      tusAvailable(form.dataset.tusEndpoint).then(function (tus) {
        form.dataset.via = tus ? "tus" : "xhr";
        if (tus) {
          uploadWithTus(form, file);
        } else {
          uploadWithXhr(form);
        }
      });
    });
  });
})();
