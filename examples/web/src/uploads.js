// The browser side of examples/web_app.py's large-upload page: bundled by esbuild
// (not minified) into examples/web/build/uploads.js, served at /static/uploads.js.
//
// * tusUpload: tus-js-client to the app's tus endpoint; resumes after a page
//   reload (the upload URL is kept in localStorage under the file's fingerprint).
// * directUpload: Uppy with @uppy/aws-s3 (multipart) to the app's direct-to-S3
//   endpoints: the app creates the upload and signs each part with its SHA-256,
//   the browser PUTs the parts to S3, the app finalizes. Resumes after a reload:
//   the session id is kept in localStorage, and Uppy asks which parts S3 holds.
import * as tus from 'tus-js-client'
import Uppy from '@uppy/core'
import AwsS3 from '@uppy/aws-s3'

async function json(response) {
  const body = await response.json().catch(() => ({}))
  if (!response.ok) {
    throw new Error(body.error || `HTTP ${response.status}`)
  }
  return body
}

function post(url, body) {
  return fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body || {}),
  }).then(json)
}

async function sha256Base64(blob) {
  const digest = await crypto.subtle.digest('SHA-256', await blob.arrayBuffer())
  let text = ''
  for (const byte of new Uint8Array(digest)) text += String.fromCharCode(byte)
  return btoa(text)
}

// tus-js-client: options.onProgress(sent, total), returns {start, abort}.
// options.headers go with every request (an app's own, such as Authorization: on
// another origin, its CORS allow_headers must name them too).
export function tusUpload(file, options) {
  const upload = new tus.Upload(file, {
    endpoint: options.endpoint,
    headers: options.headers || {},
    chunkSize: options.chunkSize,
    retryDelays: options.retryDelays || [0, 500, 1000, 3000],
    metadata: { filename: file.name, filetype: file.type, ...options.metadata },
    storeFingerprintForResuming: true,
    removeFingerprintOnSuccess: true,
    onProgress: options.onProgress,
    onError: options.onError,
    onSuccess: () => options.onSuccess(upload.url),
  })
  return {
    async start() {
      const previous = await upload.findPreviousUploads()
      if (previous.length) {
        upload.resumeFromPreviousUpload(previous[0])
      }
      upload.start()
      return previous.length > 0
    },
    abort() {
      return upload.abort(false) // stop sending; keep the upload to resume
    },
  }
}

// Uppy + @uppy/aws-s3 against asyncassets.web.direct_uploads_app mounted at
// options.endpoint. options.partSize must be the storage's part size.
export function directUpload(file, options) {
  const base = options.endpoint.replace(/\/$/, '')
  const memory = `asyncassets-direct:${file.name}:${file.size}:${file.lastModified}`
  const uppy = new Uppy({ autoProceed: false })
  uppy.use(AwsS3, {
    shouldUseMultipart: () => true,
    getChunkSize: () => options.partSize,
    limit: 1,
    async createMultipartUpload(uppyFile) {
      const session = await post(`${base}/`, {
        filename: uppyFile.name,
        size: uppyFile.size,
        content_type: uppyFile.type || null,
        target: options.target || {},
      })
      const started = { uploadId: session.id, key: session.key }
      localStorage.setItem(memory, JSON.stringify(started))
      return started
    },
    async signPart(uppyFile, { uploadId, partNumber, body }) {
      const sha256 = await sha256Base64(body)
      return post(`${base}/${uploadId}/parts/${partNumber}`, { sha256 })
    },
    async listParts(uppyFile, { uploadId }) {
      return json(await fetch(`${base}/${uploadId}/parts`))
    },
    async completeMultipartUpload(uppyFile, { uploadId }) {
      const answer = await post(`${base}/${uploadId}/finalize`)
      localStorage.removeItem(memory)
      return { location: answer.file_id, ...answer }
    },
    async abortMultipartUpload(uppyFile, { uploadId }) {
      localStorage.removeItem(memory)
      await fetch(`${base}/${uploadId}`, { method: 'DELETE' })
    },
  })
  uppy.on('upload-progress', (f, progress) => {
    options.onProgress(progress.bytesUploaded, progress.bytesTotal)
  })
  uppy.on('upload-success', (f, response) => options.onSuccess(response.body))
  uppy.on('upload-error', (f, error) => options.onError(error))
  const id = uppy.addFile({
    name: file.name, type: file.type, data: file, source: 'page',
  })
  return {
    async start() {
      const saved = JSON.parse(localStorage.getItem(memory) || 'null')
      let resumed = false
      if (saved) {
        const alive = await fetch(`${base}/${saved.uploadId}/parts`)
        if (alive.ok) {
          uppy.setFileState(id, { s3Multipart: saved })
          resumed = true
        } else {
          localStorage.removeItem(memory)
        }
      }
      uppy.upload()
      return resumed
    },
    abort() {
      uppy.pauseResume(id)
    },
  }
}
