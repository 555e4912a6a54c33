// The interop suite: tokenproxy (target/debug/tokenproxy, or $TOKENPROXY_BIN)
// against oidc-provider (idp.mjs) and an upstream that validates tokens by
// introspection. Steps:
//   provider self-check (PKCE required; a reused refresh token is rejected),
//   `tokenproxy login` driven over HTTP (the provider's login and consent forms),
//   `tokenproxy run` with concurrent clients across >= 5 rotations, a restart
//   in the middle, a private_key_jwt client (logged in the same way) refreshed
//   across rotations with kill -9 restarts, a tls_client_auth client (the
//   provider's TLS listener, by mtls_endpoint_aliases) the same way,
//   a DPoP-bound public client (its key kept in the store, the provider's
//   nonces) the same way, client_credentials with a
//   resource indicator, a device-grant client (`login --device`, endpoints by
//   discovery, approved through the provider's pages) refreshed as well,
//   `tokenproxy doctor` against the discovery document, then the provider
//   revoking the grant -> credential dead (invalid_grant) and 503.
// Prints `INTEROP: grants=.. rotations=.. reuses=.. requests=.. failures=..`
// and exits non-zero on any failure.
import { execFileSync, spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CLIENTS, PKJWT_KEY, RESOURCE, newStats, startIdp, startUpstream } from './idp.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BIN = process.env.TOKENPROXY_BIN || path.join(ROOT, 'target', 'debug', 'tokenproxy');
const VERBOSE = process.env.INTEROP_VERBOSE === '1';
const WORKERS = 6;
const ROTATIONS_BEFORE_RESTART = 3;
const ROTATIONS_TOTAL = 6;
// private_key_jwt and tls_client_auth: rotations before each of two
// kill -9s, and in all.
const PKJWT_KILLS_AT = [2, 4];
const PKJWT_ROTATIONS_TOTAL = 6;
// DPoP: the same, for the DPoP-bound public client.
const DPOP_KILLS_AT = [2, 4];
const DPOP_ROTATIONS_TOTAL = 6;

const t0 = Date.now();
const say = (m) => console.log(`[interop +${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const failures = []; // failed steps and checks
let stepsPassed = 0;
let requests = 0;
let failedRequests = 0;
const requestFailures = [];

function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

async function step(name, fn) {
  say(`STEP ${name} ...`);
  try {
    const r = await fn();
    stepsPassed += 1;
    say(`STEP ${name}: ok`);
    return r;
  } catch (e) {
    failures.push(`${name}: ${e.message}`);
    say(`STEP ${name}: FAIL ${e.message}`);
    return undefined;
  }
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------- processes

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'tokenproxy-interop-'));
const children = new Set();

function spawnTp(args, name) {
  const logPath = path.join(TMP, `${name}.log`);
  const logFd = fs.openSync(logPath, 'a');
  const child = spawn(BIN, args, { cwd: TMP, stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  child.out = '';
  child.logPath = logPath;
  child.stdout.on('data', (d) => {
    child.out += d;
    fs.writeSync(logFd, d);
  });
  child.stderr.on('data', (d) => fs.writeSync(logFd, d));
  child.exited = new Promise((resolve) =>
    child.on('exit', (code, signal) => {
      children.delete(child);
      fs.closeSync(logFd);
      resolve({ code, signal });
    }),
  );
  return child;
}

async function waitFor(what, fn, timeoutMs, everyMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await sleep(everyMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (${last.message})` : ''}`);
}

function tail(file, n = 25) {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '';
  }
}

// ------------------------------------------------------------- a "browser"

class Jar {
  constructor() {
    this.c = new Map();
  }
  store(setCookies) {
    for (const sc of setCookies) {
      const [pair] = sc.split(';');
      const i = pair.indexOf('=');
      const name = pair.slice(0, i).trim();
      const value = pair.slice(i + 1).trim();
      if (/expires=Thu, 01 Jan 1970/i.test(sc) || value === '') this.c.delete(name);
      else this.c.set(name, value);
    }
  }
  header() {
    return [...this.c].map(([k, v]) => `${k}=${v}`).join('; ');
  }
}

function parseForm(html, base) {
  const f = /<form[^>]*action="([^"]*)"[^>]*>([\s\S]*?)<\/form>/i.exec(html);
  if (!f) return undefined;
  const fields = {};
  for (const m of f[2].matchAll(/<input([^>]*)>/gi)) {
    const name = /name="([^"]*)"/.exec(m[1]);
    if (!name) continue;
    const value = /value="([^"]*)"/.exec(m[1]);
    fields[name[1]] = value ? value[1] : '';
  }
  return { action: new URL(f[1].replace(/&amp;/g, '&'), base).href, fields };
}

// Follows redirects by hand and submits the provider's login and consent
// forms, until the browser would go to a URL starting with `stopPrefix`.
// With `doneRe`, a page without a form matching it ends the walk too.
async function browse(startUrl, stopPrefix, jar, user = 'alice', doneRe = undefined) {
  let url = startUrl;
  let body;
  const trail = [];
  for (let i = 0; i < 20; i += 1) {
    if (stopPrefix && url.startsWith(stopPrefix)) return url;
    const res = await fetch(url, {
      method: body ? 'POST' : 'GET',
      body,
      redirect: 'manual',
      headers: {
        cookie: jar.header(),
        ...(body ? { 'content-type': 'application/x-www-form-urlencoded' } : {}),
      },
      signal: AbortSignal.timeout(10000),
    });
    jar.store(res.headers.getSetCookie());
    trail.push(`${body ? 'POST' : 'GET'} ${new URL(url).pathname} -> ${res.status}`);
    body = undefined;
    if (res.status >= 300 && res.status < 400) {
      url = new URL(res.headers.get('location'), url).href;
      continue;
    }
    const html = await res.text();
    const form = res.status === 200 ? parseForm(html, url) : undefined;
    if (!form && doneRe && res.status === 200 && doneRe.test(html)) return url;
    if (!form) throw new Error(`no form at ${url} (${res.status}): ${html.slice(0, 300)} [${trail.join(', ')}]`);
    if ('login' in form.fields) form.fields.login = user;
    if ('password' in form.fields) form.fields.password = 'any-password';
    if (VERBOSE) say(`  form ${JSON.stringify(form)}`);
    url = form.action;
    body = new URLSearchParams(form.fields).toString();
  }
  throw new Error(`too many steps: ${trail.join(', ')}`);
}

// ------------------------------------------------------------------- helpers

const b64url = (buf) => buf.toString('base64url');
const basicAuth = (c) =>
  `Basic ${Buffer.from(`${encodeURIComponent(c.id)}:${encodeURIComponent(c.secret)}`).toString('base64')}`;

async function tokenRequest(issuer, client, params) {
  const r = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { authorization: basicAuth(client), 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(params),
  });
  return { status: r.status, body: await r.json() };
}

async function admin(base, p) {
  const r = await fetch(`${base}${p}`, {
    headers: { 'x-tokenproxy-admin': '1' },
    signal: AbortSignal.timeout(5000),
  });
  return { status: r.status, body: await r.json().catch(() => undefined) };
}

// Every refresh_token credential of the proxy rotates in the background
// (4-second tokens). A kill -9 aimed at one credential must not land while
// another's rotation is in flight: that one would be a genuine lost rotation
// (dead, by design), not what the step tests. Waits until none is
// refreshing; the kill follows within a millisecond or two.
async function quietForKill(base) {
  const until = Date.now() + 10000;
  for (;;) {
    const all = (await admin(base, '/credentials')).body || [];
    const busy = all.filter((c) => c.state === 'refreshing').map((c) => c.credential);
    if (busy.length === 0 || Date.now() > until) return busy;
    await sleep(5);
  }
}

async function proxied(base, p) {
  requests += 1;
  try {
    const r = await fetch(`${base}${p}`, { signal: AbortSignal.timeout(20000) });
    const text = await r.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
    return { status: r.status, body, headers: r.headers };
  } catch (e) {
    return { status: 0, body: String(e) };
  }
}

function requestFailed(what) {
  failedRequests += 1;
  if (requestFailures.length < 10) requestFailures.push(what);
  if (VERBOSE || requestFailures.length <= 3) say(`  request failed: ${what}`);
}

// WORKERS concurrent clients send requests until `until()` holds.
async function load(base, prefix, until, timeoutMs, verify) {
  const deadline = Date.now() + timeoutMs;
  let stop = false;
  let sent = 0;
  const worker = async (w) => {
    let i = 0;
    while (!stop && Date.now() < deadline) {
      i += 1;
      sent += 1;
      const p = `${prefix}echo?w=${w}&i=${i}`;
      const r = await proxied(base, p);
      const bad = r.status !== 200 ? `status ${r.status}` : verify(r.body);
      if (bad) requestFailed(`GET ${p}: ${bad}: ${JSON.stringify(r.body).slice(0, 300)}`);
      if (until()) stop = true;
      await sleep(20);
    }
  };
  await Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
  check(until(), `condition not reached within ${timeoutMs} ms (${sent} requests sent)`);
  return sent;
}

// A CA, a server certificate for 127.0.0.1 and a client certificate with
// `subject`, made with the openssl command line (PEM files in `dir`).
function makeCertificates(dir, subject) {
  const f = (n) => path.join(dir, n);
  const openssl = (...args) => execFileSync('openssl', args, { stdio: 'pipe' });
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl('req', '-x509', ...key, '-keyout', f('ca.key'), '-out', f('ca.pem'), '-days', '2', '-subj', '/CN=tokenproxy interop CA');
  const leaf = (name, subj, ext) => {
    fs.writeFileSync(f(`${name}.ext`), `basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n${ext}\n`);
    openssl('req', ...key, '-keyout', f(`${name}.key`), '-out', f(`${name}.csr`), '-subj', subj);
    openssl('x509', '-req', '-in', f(`${name}.csr`), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial',
      '-out', f(`${name}.pem`), '-days', '2', '-extfile', f(`${name}.ext`));
  };
  leaf('server', '/CN=127.0.0.1', 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth');
  leaf('client', `/${subject}`, 'extendedKeyUsage=clientAuth');
  return { ca: f('ca.pem'), serverKey: f('server.key'), serverCert: f('server.pem'), clientKey: f('client.key'), clientCert: f('client.pem') };
}

// ---------------------------------------------------------------------- main

async function main() {
  check(fs.existsSync(BIN), `${BIN} not found: run cargo build first`);
  const [idpPort, upPort, proxyPort, adminPort, mtlsPort] = [
    await freePort(),
    await freePort(),
    await freePort(),
    await freePort(),
    await freePort(),
  ];
  const certs = makeCertificates(TMP, CLIENTS.mtls.subject);
  const redirectUri = `http://127.0.0.1:${adminPort}/callback`;
  const stats = newStats();
  // Per client: the private_key_jwt credential rotates alongside.
  const rotations = () => stats.byClient[CLIENTS.user.id]?.refresh_token || 0;
  const pkRotations = () => stats.byClient[CLIENTS.pkjwt.id]?.refresh_token || 0;
  const deviceRotations = () => stats.byClient[CLIENTS.device.id]?.refresh_token || 0;
  const mtlsRotations = () => stats.byClient[CLIENTS.mtls.id]?.refresh_token || 0;
  const dpopRotations = () => stats.byClient[CLIENTS.dpop.id]?.refresh_token || 0;
  const idpLog = fs.createWriteStream(path.join(TMP, 'idp.log'));
  const log = (l) => {
    idpLog.write(`${new Date().toISOString()} ${l}\n`);
    if (VERBOSE) say(`  idp: ${l}`);
  };
  const mtls = {
    port: mtlsPort,
    key: fs.readFileSync(certs.serverKey),
    cert: fs.readFileSync(certs.serverCert),
    ca: fs.readFileSync(certs.ca),
  };
  const idp = await startIdp({ port: idpPort, redirectUris: [redirectUri], mtls, stats, log });
  const up = await startUpstream({ port: upPort, issuer: idp.issuer, log });
  const { issuer } = idp;
  const proxy = `http://127.0.0.1:${proxyPort}`;
  const adminBase = `http://127.0.0.1:${adminPort}`;
  say(`provider ${issuer}, upstream :${upPort}, proxy :${proxyPort}, admin :${adminPort}, work dir ${TMP}`);

  const cfg = path.join(TMP, 'proxy.toml');
  const writeConfig = (authorizeUrl, file = cfg) => fs.writeFileSync(
    file,
    `# written by tests/interop/run.mjs
[server]
listen = "127.0.0.1:${proxyPort}"

[admin]
listen = "127.0.0.1:${adminPort}"

[store]
path = "tokens.json"

[log]
format = "json"
level = "info,tokenproxy=debug"

[credentials.user]
grant = "refresh_token"
issuer = "${issuer}"
client_id = "${CLIENTS.user.id}"
client_secret = "\${INTEROP_USER_SECRET}"
auth_method = "client_secret_basic"
scopes = ["openid", "offline_access"]
redirect_uri = "${redirectUri}"
${authorizeUrl ? `authorize_url = "${authorizeUrl}"\n` : ''}introspection_url = "${issuer}/token/introspection"

[credentials.machine]
grant = "client_credentials"
issuer = "${issuer}"
client_id = "${CLIENTS.machine.id}"
client_secret = "\${INTEROP_M2M_SECRET}"
auth_method = "client_secret_post"
scopes = ["api:read"]
resource = "${RESOURCE}"

[credentials.pkjwt]
grant = "refresh_token"
issuer = "${issuer}"
client_id = "${CLIENTS.pkjwt.id}"
auth_method = "private_key_jwt"
client_assertion_key = "${PKJWT_KEY}"
scopes = ["openid", "offline_access"]
redirect_uri = "${redirectUri}"
introspection_url = "${issuer}/token/introspection"

[credentials.mtls]
grant = "refresh_token"
issuer = "${issuer}"
client_id = "${CLIENTS.mtls.id}"
auth_method = "tls_client_auth"
client_cert = "${certs.clientCert}"
client_key = "${certs.clientKey}"
ca_file = "${certs.ca}"
scopes = ["openid", "offline_access"]
redirect_uri = "${redirectUri}"
introspection_url = "https://127.0.0.1:${mtlsPort}/token/introspection"

[credentials.device]
grant = "refresh_token"
issuer = "${issuer}"
client_id = "${CLIENTS.device.id}"
client_secret = "\${INTEROP_DEVICE_SECRET}"
scopes = ["openid", "offline_access"]
introspection_url = "${issuer}/token/introspection"

[credentials.dpop]
grant = "refresh_token"
issuer = "${issuer}"
client_id = "${CLIENTS.dpop.id}"
auth_method = "none"
dpop = true
scopes = ["openid", "offline_access"]
redirect_uri = "${redirectUri}"

[[routes]]
path_prefix = "/dpop/"
upstream = "http://127.0.0.1:${upPort}/"
credential = "dpop"

[[routes]]
path_prefix = "/device/"
upstream = "http://127.0.0.1:${upPort}/"
credential = "device"

[[routes]]
path_prefix = "/mtls/"
upstream = "http://127.0.0.1:${upPort}/"
credential = "mtls"

[[routes]]
path_prefix = "/pkjwt/"
upstream = "http://127.0.0.1:${upPort}/"
credential = "pkjwt"

[[routes]]
path_prefix = "/user/"
upstream = "http://127.0.0.1:${upPort}/"
credential = "user"

[[routes]]
path_prefix = "/machine/"
upstream = "http://127.0.0.1:${upPort}/"
credential = "machine"
`,
  );
  writeConfig();
  process.env.INTEROP_USER_SECRET = CLIENTS.user.secret;
  process.env.INTEROP_M2M_SECRET = CLIENTS.machine.secret;
  process.env.INTEROP_DEVICE_SECRET = CLIENTS.device.secret;
  const storePath = path.join(TMP, 'tokens.json');
  // The file store keeps one file per credential in <store.path>.d/.
  const stored = (name) => {
    try {
      return JSON.parse(fs.readFileSync(path.join(`${storePath}.d`, `${name}.json`), 'utf8')).record;
    } catch {
      return undefined;
    }
  };
  const jar = new Jar();
  let reusesBeforeRevocation = 0;

  await step('tokenproxy check', async () => {
    const c = spawnTp(['check', '-c', cfg], 'check');
    const { code } = await c.exited;
    check(code === 0, `exit ${code}: ${tail(c.logPath)}`);
  });

  // ---- login (authorization code + PKCE), no browser
  let family;
  const families = {};
  // Errors the driver's own probes caused, not tokenproxy.
  const driverErrors = new Set();
  const login = async (name = 'user') => {
    const child = spawnTp(['login', '-c', cfg, name], `login-${name}`);
    try {
      const url = await waitFor(
        'the authorization URL on stdout',
        () => {
          const m = /(http:\/\/127\.0\.0\.1:\d+\/auth\?\S+)/.exec(child.out);
          return m && m[1];
        },
        15000,
      );
      const au = new URL(url);
      check(au.searchParams.get('code_challenge_method') === 'S256', `no S256 PKCE in ${url}`);
      const clientId = CLIENTS[name].id;
      check(au.searchParams.get('client_id') === clientId, `client_id in ${url}`);
      const grantsBefore = stats.byClient[clientId]?.authorization_code || 0;
      const callback = await browse(url, redirectUri, jar);
      check(new URL(callback).searchParams.get('code'), `no code in the callback ${callback}`);
      // The last hop: the browser lands on tokenproxy's own callback listener.
      const page = await waitFor(
        'the login callback listener',
        async () => {
          const r = await fetch(callback, { signal: AbortSignal.timeout(15000) });
          return { status: r.status, text: await r.text() };
        },
        10000,
      );
      const { code } = await Promise.race([child.exited, sleep(15000).then(() => ({ code: 'timeout' }))]);
      const scope = au.searchParams.get('scope') || '';
      check(
        !scope.split(' ').includes('offline_access') || /consent/.test(au.searchParams.get('prompt') || ''),
        `the authorization request asks for offline_access without prompt=consent (OpenID Connect Core 1.0 §11 requires it; oidc-provider drops offline_access, so no refresh token): sent ${url}; callback answered ${page.status}; login exited ${code}: ${tail(child.logPath, 1)}`,
      );
      check(
        page.status === 200 && code === 0,
        `sent ${url}; callback answered ${page.status}; login exited ${code}: ${tail(child.logPath, 3)}`,
      );
      check((stats.byClient[clientId]?.authorization_code || 0) === grantsBefore + 1, 'no authorization_code grant at the provider');
      const rec = stored(name);
      check(rec?.refresh_token, `no refresh token in the store for ${name}`);
      if (name === 'user') family = rec.family;
      else families[name] = rec.family;
    } finally {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await child.exited;
      }
    }
  };
  // OpenID Connect Core 1.0 §11: offline_access needs prompt=consent;
  // tokenproxy must send it by itself (checked in login()).
  const loggedIn = await step('login as configured: tokenproxy login driven through the provider forms', async () => {
    await login();
    return true;
  });
  if (!loggedIn) return finish();
  const pkjwtLoggedIn = await step('login a private_key_jwt client (ES256 assertions) the same way', async () => {
    await login('pkjwt');
    return true;
  });
  const mtlsLoggedIn = await step('login a tls_client_auth client (certificate on the provider\'s TLS listener, found by mtls_endpoint_aliases)', async () => {
    await login('mtls');
    // The provider does check: the same client without its certificate is refused.
    const refused = await new Promise((resolve, reject) => {
      const req = https.request(
        `https://127.0.0.1:${mtlsPort}/token`,
        { method: 'POST', ca: mtls.ca, headers: { 'content-type': 'application/x-www-form-urlencoded' } },
        (res) => {
          let body = '';
          res.on('data', (d) => { body += d; });
          res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(body) }));
        },
      );
      req.on('error', reject);
      req.end(new URLSearchParams({ grant_type: 'refresh_token', refresh_token: 'not-a-token', client_id: CLIENTS.mtls.id }).toString());
    });
    check(
      refused.status === 401 && refused.body.error === 'invalid_client',
      `without a client certificate: ${refused.status} ${JSON.stringify(refused.body)}`,
    );
    const probe = stats.errors.at(-1);
    check(probe?.detail === 'client certificate was not provided', `the provider's reason: ${JSON.stringify(probe)}`);
    driverErrors.add(probe);
    return true;
  });

  const dpopLoggedIn = await step('login a DPoP-bound public client (proofs with the provider nonce) the same way', async () => {
    await login('dpop');
    check(stored('dpop')?.dpop_key, 'the generated DPoP key is not in the store');
    return true;
  });

  // ---- the device grant: no redirect, a code entered on "another device"
  const deviceGrant = 'urn:ietf:params:oauth:grant-type:device_code';
  let deviceFamily;
  const deviceLoggedIn = await step('device login: tokenproxy login --device, approved in the provider pages', async () => {
    const child = spawnTp(['login', '--device', '-c', cfg, 'device'], 'login-device');
    try {
      const { userCode, complete } = await waitFor(
        'the user code and link on stdout',
        () => {
          const c = /^Code: (\S+)$/m.exec(child.out);
          const l = /(http:\/\/127\.0\.0\.1:\d+\/device\?user_code=\S+)/.exec(child.out);
          return c && l && { userCode: c[1], complete: l[1] };
        },
        15000,
      );
      check(complete.includes(encodeURIComponent(userCode)) || complete.includes(userCode), `${complete} vs ${userCode}`);
      await browse(complete, undefined, new Jar(), 'alice', /Sign-in Success/);
      // The provider names no interval: tokenproxy polls every 5 s.
      const { code } = await Promise.race([child.exited, sleep(20000).then(() => ({ code: 'timeout' }))]);
      check(code === 0, `login --device exited ${code}: ${tail(child.logPath, 5)}`);
      check(/Logged in as alice/.test(child.out), `stdout: ${child.out}`);
      check((stats.byClient[CLIENTS.device.id]?.[deviceGrant] || 0) === 1, `device_code grants ${JSON.stringify(stats.byClient)}`);
      const rec = stored('device');
      check(rec?.refresh_token, 'no refresh token in the store');
      deviceFamily = rec.family;
      const early = stats.errors.filter((e) => e.client === CLIENTS.device.id && e.error !== 'authorization_pending');
      check(early.length === 0, `device errors other than authorization_pending: ${JSON.stringify(early)}`);
    } finally {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await child.exited;
      }
    }
    return true;
  });

  // ---- run, concurrent clients across rotations, restart in the middle
  let run;
  const startRun = async (name) => {
    run = spawnTp(['run', '-c', cfg], name);
    await waitFor(
      'tokenproxy /readyz',
      async () => {
        if (run.exitCode !== null) throw new Error(`exited ${run.exitCode}: ${tail(run.logPath)}`);
        return (await admin(adminBase, '/readyz')).status === 200;
      },
      20000,
    );
  };
  const userStatus = async () => {
    const r = await admin(adminBase, '/credentials/user');
    check(r.status === 200, `/credentials/user answered ${r.status}`);
    return r.body;
  };
  const verifyUser = (b) =>
    b.client_id !== CLIENTS.user.id ? `token of client ${b.client_id}` : b.sub !== 'alice' ? `sub ${b.sub}` : undefined;

  if (!(await step('run: start', async () => { await startRun('run1'); return true; }))) return finish();
  await step(`run: ${WORKERS} concurrent clients until ${ROTATIONS_BEFORE_RESTART} rotations`, async () => {
    await load(proxy, '/user/', () => rotations() >= ROTATIONS_BEFORE_RESTART, 45000, verifyUser);
    const s = await userStatus();
    if (family) check(s.family === family, `family changed: ${family} -> ${s.family}`);
    say(`  user: state=${s.state} family=${s.family} generation=${s.generation}; rotations=${rotations()}`);
  });

  await step('restart: SIGTERM, start again, same family', async () => {
    const before = await userStatus();
    run.kill('SIGTERM');
    const { code, signal } = await Promise.race([run.exited, sleep(25000).then(() => ({ code: 'timeout' }))]);
    check(code === 0, `tokenproxy exited ${code} ${signal ?? ''} on SIGTERM: ${tail(run.logPath)}`);
    await startRun('run2');
    const after = await userStatus();
    check(after.family === before.family, `family ${before.family} -> ${after.family}`);
    check(after.generation >= before.generation, `generation ${before.generation} -> ${after.generation}`);
    say(`  user after restart: state=${after.state} family=${after.family} generation=${after.generation}`);
  });

  await step(`run: ${WORKERS} concurrent clients until ${ROTATIONS_TOTAL} rotations in all`, async () => {
    await load(proxy, '/user/', () => rotations() >= ROTATIONS_TOTAL, 45000, verifyUser);
    const s = await userStatus();
    if (family) check(s.family === family, `family changed: ${family} -> ${s.family}`);
    check(s.generation >= ROTATIONS_TOTAL - 1, `generation ${s.generation} after ${rotations()} rotations`);
    say(`  user: state=${s.state} family=${s.family} generation=${s.generation}; rotations=${rotations()}`);
  });

  // Rotations with two kill -9 restarts in between, for a credential that
  // has rotated in the background since its login.
  const rotateAcrossKills = async (name, rotationsOf) => {
    const clientId = CLIENTS[name].id;
    const verify = (b) => (b.client_id !== clientId ? `token of client ${b.client_id}` : b.sub !== 'alice' ? `sub ${b.sub}` : undefined);
    const base = rotationsOf();
    for (const [i, at] of PKJWT_KILLS_AT.entries()) {
      await load(proxy, `/${name}/`, () => rotationsOf() >= base + at, 45000, verify);
      // Just after a rotation: the new token is durable before it is served.
      await sleep(300);
      const before = await admin(adminBase, `/credentials/${name}`);
      const busy = await quietForKill(adminBase);
      check(busy.length === 0, `still refreshing after 10 s: ${busy.join(', ')}`);
      run.kill('SIGKILL');
      await run.exited;
      await startRun(`run-${name}-kill${i + 1}`);
      const after = (await admin(adminBase, `/credentials/${name}`)).body;
      check(after.family === before.body.family, `family ${before.body.family} -> ${after.family}`);
      check(after.generation >= before.body.generation, `generation ${before.body.generation} -> ${after.generation}`);
      say(`  ${name} after kill -9 #${i + 1}: state=${after.state} generation=${after.generation}; rotations=${rotationsOf()}`);
    }
    await load(proxy, `/${name}/`, () => rotationsOf() >= base + PKJWT_ROTATIONS_TOTAL, 45000, verify);
    const s = (await admin(adminBase, `/credentials/${name}`)).body;
    check(s.family === families[name], `family changed: ${families[name]} -> ${s.family}`);
    check(s.generation >= base + PKJWT_ROTATIONS_TOTAL - 1, `generation ${s.generation} after ${rotationsOf()} rotations`);
    const errs = stats.errors.filter((e) => e.client === clientId && !driverErrors.has(e));
    check(errs.length === 0, `token endpoint errors for ${clientId}: ${JSON.stringify(errs)}`);
  };
  if (pkjwtLoggedIn) {
    await step(`private_key_jwt: ${PKJWT_ROTATIONS_TOTAL} rotations, kill -9 after ${PKJWT_KILLS_AT.join(' and ')}`, () =>
      rotateAcrossKills('pkjwt', pkRotations));
  }
  if (mtlsLoggedIn) {
    await step(`tls_client_auth: ${PKJWT_ROTATIONS_TOTAL} rotations, kill -9 after ${PKJWT_KILLS_AT.join(' and ')}`, () =>
      rotateAcrossKills('mtls', mtlsRotations));
  }

  // use_dpop_nonce is the provider asking for its nonce: one retry, not a failure.
  const dpopErrors = () => stats.errors.filter((e) => e.client === CLIENTS.dpop.id && e.error !== 'use_dpop_nonce');
  if (dpopLoggedIn) {
    await step(`DPoP: ${DPOP_ROTATIONS_TOTAL} rotations of a key-bound refresh token, kill -9 after ${DPOP_KILLS_AT.join(' and ')}`, async () => {
      const verifyDpop = (b) =>
        b.client_id !== CLIENTS.dpop.id ? `token of client ${b.client_id}` : b.sub !== 'alice' ? `sub ${b.sub}` : undefined;
      const base = dpopRotations();
      const servedBefore = up.stats.dpopServed;
      for (const [i, at] of DPOP_KILLS_AT.entries()) {
        await load(proxy, '/dpop/', () => dpopRotations() >= base + at, 45000, verifyDpop);
        await sleep(300);
        const before = await admin(adminBase, '/credentials/dpop');
        const busy = await quietForKill(adminBase);
        check(busy.length === 0, `still refreshing after 10 s: ${busy.join(', ')}`);
        run.kill('SIGKILL');
        await run.exited;
        await startRun(`run-dpop-kill${i + 1}`);
        const after = (await admin(adminBase, '/credentials/dpop')).body;
        check(after.family === before.body.family, `family ${before.body.family} -> ${after.family}`);
        say(`  dpop after kill -9 #${i + 1}: state=${after.state} generation=${after.generation}; rotations=${dpopRotations()}`);
      }
      await load(proxy, '/dpop/', () => dpopRotations() >= base + DPOP_ROTATIONS_TOTAL, 45000, verifyDpop);
      const s = (await admin(adminBase, '/credentials/dpop')).body;
      check(s.family === families.dpop, `family changed: ${families.dpop} -> ${s.family}`);
      check(up.stats.dpopServed > servedBefore, 'the upstream verified no DPoP proof');
      check(up.stats.dpopRejected.length === 0, `upstream DPoP refusals: ${JSON.stringify(up.stats.dpopRejected.slice(0, 5))}`);
      check(dpopErrors().length === 0, `token endpoint errors for the DPoP client: ${JSON.stringify(dpopErrors())}`);
      say(`  dpop: nonce challenges at the token endpoint ${stats.errors.filter((e) => e.client === CLIENTS.dpop.id).length}`);
    });
  }

  if (deviceLoggedIn) {
    await step('device-grant credential: refreshed across the restarts, same family', async () => {
      const verifyDevice = (b) =>
        b.client_id !== CLIENTS.device.id ? `token of client ${b.client_id}` : b.sub !== 'alice' ? `sub ${b.sub}` : undefined;
      const base = deviceRotations();
      await load(proxy, '/device/', () => deviceRotations() >= base + 2, 45000, verifyDevice);
      const s = (await admin(adminBase, '/credentials/device')).body;
      check(s.family === deviceFamily, `family changed: ${deviceFamily} -> ${s.family}`);
      check(deviceRotations() >= 4, `only ${deviceRotations()} rotations across the restarts`);
      const errs = stats.errors.filter((e) => e.client === CLIENTS.device.id && e.error !== 'authorization_pending');
      check(errs.length === 0, `token endpoint errors for the device client: ${JSON.stringify(errs)}`);
      // The device code is a secret: in no output of any tokenproxy process.
      for (const f of fs.readdirSync(TMP).filter((n) => n.endsWith('.log') && n !== 'idp.log')) {
        const text = fs.readFileSync(path.join(TMP, f), 'utf8');
        for (const dc of stats.deviceCodes) check(!text.includes(dc), `${f} contains a device code`);
      }
    });
  }

  await step('client_credentials with resource (client_secret_post)', async () => {
    const rs = await Promise.all(Array.from({ length: 8 }, (_, i) => proxied(proxy, `/machine/echo?i=${i}`)));
    for (const r of rs) {
      const b = r.body;
      const bad =
        r.status !== 200
          ? `status ${r.status}`
          : b.client_id !== CLIENTS.machine.id
            ? `client ${b.client_id}`
            : (Array.isArray(b.aud) ? !b.aud.includes(RESOURCE) : b.aud !== RESOURCE)
              ? `aud ${JSON.stringify(b.aud)}`
              : undefined;
      if (bad) requestFailed(`GET /machine/echo: ${bad}: ${JSON.stringify(b).slice(0, 300)}`);
    }
    check(rs.every((r) => r.status === 200), `statuses ${rs.map((r) => r.status)}`);
    check((stats.grants.client_credentials || 0) >= 1, 'no client_credentials grant at the provider');
    // Past the access-token lifetime: a fresh token, still for the resource.
    await sleep(5000);
    const r = await proxied(proxy, '/machine/echo?again');
    check(r.status === 200 && r.body.aud && String(r.body.aud).includes(RESOURCE), `after expiry: ${r.status} ${JSON.stringify(r.body)}`);
  });

  const errorsBeforeDoctor = stats.errors.length;
  await step('doctor against the discovery document', async () => {
    // The config as a user writes it: endpoints from discovery only.
    const doctorCfg = path.join(TMP, 'doctor.toml');
    writeConfig(undefined, doctorCfg);
    const d = spawnTp(['doctor', '-c', doctorCfg], 'doctor');
    const { code } = await d.exited;
    check(code === 0, `doctor exited ${code}:\n${tail(d.logPath, 40)}`);
  });

  reusesBeforeRevocation = stats.reuses;
  await step('no refresh token reused (provider reuse rejections = 0)', async () => {
    // doctor probes client authentication with a made-up refresh token.
    const other = stats.errors.filter(
      (e, i) =>
        !driverErrors.has(e) &&
        (e.client === CLIENTS.user.id || e.client === CLIENTS.pkjwt.id || e.client === CLIENTS.mtls.id || (e.client === CLIENTS.device.id && e.error !== 'authorization_pending') || (e.client === CLIENTS.dpop.id && e.error !== 'use_dpop_nonce')) &&
        !(i >= errorsBeforeDoctor && e.detail === 'refresh token not found'),
    );
    check(stats.reuses === 0, `provider rejected ${stats.reuses} reused refresh token(s)`);
    check(other.length === 0, `token endpoint errors for the user client: ${JSON.stringify(other)}`);
  });

  // ---- the provider revokes the grant
  await step('revocation: credential dead with the invalid_grant hint, 503 credential_unavailable', async () => {
    const rt = stored('user').refresh_token;
    const r = await fetch(`${issuer}/token/revocation`, {
      method: 'POST',
      headers: { authorization: basicAuth(CLIENTS.user), 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token: rt, token_type_hint: 'refresh_token' }),
    });
    check(r.status === 200, `revocation answered ${r.status}`);
    check(stats.revokedGrants >= 1, 'the provider did not revoke the grant');
    const seen = {};
    const last = await waitFor(
      '503 credential_unavailable',
      async () => {
        const p = await proxied(proxy, '/user/echo?after-revocation');
        seen[p.status] = (seen[p.status] || 0) + 1;
        return p.status === 503 ? p : undefined;
      },
      30000,
      250,
    ).catch((e) => {
      throw new Error(`${e.message}; statuses seen ${JSON.stringify(seen)}`);
    });
    say(`  statuses after revocation: ${JSON.stringify(seen)}; 503 body ${JSON.stringify(last.body)}`);
    check(JSON.stringify(last.body).includes('credential_unavailable'), `503 body ${JSON.stringify(last.body)}`);
    const s = await userStatus();
    say(`  user: state=${s.state} last_error=${JSON.stringify(s.last_error)}`);
    check(String(s.state).toLowerCase() === 'dead', `state ${s.state}`);
    check(s.last_error?.outcome === 'invalid_grant', `last_error ${JSON.stringify(s.last_error)}`);
    check(s.last_error?.hint, 'no hint');
  });

  await step('stop tokenproxy', async () => {
    run.kill('SIGTERM');
    const { code } = await Promise.race([run.exited, sleep(25000).then(() => ({ code: 'timeout' }))]);
    check(code === 0, `exit ${code}`);
  });

  // ---- the provider itself: PKCE required, reused refresh token rejected
  const reusesBeforeProbe = stats.reuses;
  await step('provider self-check: PKCE required, a reused refresh token is rejected', async () => {
    const cb = 'http://127.0.0.1/probe-callback';
    const noPkce = new URL(`${issuer}/auth`);
    noPkce.search = new URLSearchParams({ response_type: 'code', client_id: CLIENTS.probe.id, redirect_uri: cb, scope: 'openid offline_access', state: 's' });
    const loc = (await fetch(noPkce, { redirect: 'manual' })).headers.get('location') || '';
    check(/error=invalid_request/.test(loc), `authorization without PKCE was not refused: ${loc}`);
    const verifier = b64url(crypto.randomBytes(32));
    const challenge = b64url(crypto.createHash('sha256').update(verifier).digest());
    const au = new URL(`${issuer}/auth`);
    au.search = new URLSearchParams({
      response_type: 'code', client_id: CLIENTS.probe.id, redirect_uri: cb, scope: 'openid offline_access',
      state: 's', code_challenge: challenge, code_challenge_method: 'S256', prompt: 'consent',
    });
    const done = await browse(au.href, cb, jar);
    const code = new URL(done).searchParams.get('code');
    const t1 = await tokenRequest(issuer, CLIENTS.probe, { grant_type: 'authorization_code', code, redirect_uri: cb, code_verifier: verifier });
    check(t1.status === 200 && t1.body.refresh_token, `code exchange ${t1.status} ${JSON.stringify(t1.body)}`);
    const t2 = await tokenRequest(issuer, CLIENTS.probe, { grant_type: 'refresh_token', refresh_token: t1.body.refresh_token });
    check(t2.status === 200 && t2.body.refresh_token && t2.body.refresh_token !== t1.body.refresh_token, `refresh did not rotate: ${JSON.stringify(t2.body)}`);
    const t3 = await tokenRequest(issuer, CLIENTS.probe, { grant_type: 'refresh_token', refresh_token: t1.body.refresh_token });
    check(t3.status === 400 && t3.body.error === 'invalid_grant', `reused refresh token: ${t3.status} ${JSON.stringify(t3.body)}`);
    check(stats.reuses === reusesBeforeProbe + 1, `reuse not counted (${stats.reuses})`);
    const t4 = await tokenRequest(issuer, CLIENTS.probe, { grant_type: 'refresh_token', refresh_token: t2.body.refresh_token });
    check(t4.status === 400, `the family survived the reuse: ${t4.status}`);
  });

  return finish();

  function finish() {
  for (const c of children) c.kill('SIGKILL');
  idp.server.close();
  idp.tlsServer?.close();
  up.server.close();
  idpLog.end();

  const grants = Object.values(stats.grants).reduce((a, b) => a + b, 0);
  const total = failures.length + failedRequests;
  if (requestFailures.length) say(`first failed requests:\n  ${requestFailures.join('\n  ')}`);
  if (failures.length) {
    say(`failed steps:\n  ${failures.join('\n  ')}`);
    say(`logs kept in ${TMP}`);
  }
  say(`provider grants by type ${JSON.stringify(stats.grants)}; upstream served ${up.stats.served}, rejected ${up.stats.rejected}`);
  console.log(
    `INTEROP: grants=${grants} rotations=${rotations()} private_key_jwt_rotations=${pkRotations()} tls_client_auth_rotations=${mtlsRotations()} device_rotations=${deviceRotations()} dpop_rotations=${dpopRotations()} reuses=${reusesBeforeRevocation} requests=${requests} failures=${total}`,
  );
  console.log(`interop: ${stepsPassed} passed, ${failures.length} failed`);
  if (!total && !process.env.INTEROP_KEEP) fs.rmSync(TMP, { recursive: true, force: true });
  return total === 0 ? 0 : 1;
}
}

const hardTimeout = setTimeout(() => {
  console.log(`INTEROP: aborted after 240 s; logs in ${TMP}`);
  for (const c of children) c.kill('SIGKILL');
  process.exit(2);
}, 240000);
hardTimeout.unref();

main()
  .then((code) => process.exit(code))
  .catch((e) => {
    console.log(`INTEROP: crashed: ${e.stack}; logs in ${TMP}`);
    for (const c of children) c.kill('SIGKILL');
    process.exit(2);
  });
