// The interop identity provider: oidc-provider (a certified OpenID Provider,
// pinned in package.json) with the configuration tokenproxy is proven
// against, plus `upstream`, a resource server that accepts a bearer token
// only after introspecting it at the provider, and a DPoP-bound token only
// with a valid proof signed by the key its introspection names (`cnf.jkt`).
//
// Standalone: node idp.mjs <idp-port> [<upstream-port>] [<redirect_uri>]
// prints `READY <port>` when listening. run.mjs imports startIdp() instead,
// so it can count the provider's events.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import Provider, { errors } from 'oidc-provider';

export const ACCESS_TTL = 4; // seconds: a rotation every couple of seconds
export const RESOURCE = 'https://api.interop.test/';
export const CLIENTS = {
  user: { id: 'tokenproxy-user', secret: 'interop-user-secret-0123456789' },
  machine: { id: 'tokenproxy-m2m', secret: 'interop-m2m-secret-0123456789' },
  probe: { id: 'interop-probe', secret: 'interop-probe-secret-0123456789' },
  upstream: { id: 'interop-upstream', secret: 'interop-upstream-secret-012345' },
  // private_key_jwt (RFC 7523): no secret; the provider holds the public
  // half of pkjwt-ec.key (a P-256 test key made for this suite).
  pkjwt: { id: 'tokenproxy-pkjwt' },
  // tls_client_auth (RFC 8705 §2.1): no secret; a client certificate from
  // the suite's CA with this subject, presented on the provider's TLS
  // listener (the metadata's mtls_endpoint_aliases).
  mtls: { id: 'tokenproxy-mtls', subject: 'CN=tokenproxy-mtls' },
  // The device grant (RFC 8628), bootstrapped by `tokenproxy login --device`.
  device: { id: 'tokenproxy-device', secret: 'interop-device-secret-0123456789' },
  // DPoP (RFC 9449): a public client, so the provider binds its refresh
  // tokens to the key too; every proof must carry the provider's nonce.
  dpop: { id: 'tokenproxy-dpop' },
};
export const PKJWT_KEY = path.join(path.dirname(fileURLToPath(import.meta.url)), 'pkjwt-ec.key');

function publicJwk(keyFile) {
  const jwk = crypto.createPublicKey(fs.readFileSync(keyFile)).export({ format: 'jwk' });
  return { ...jwk, use: 'sig', alg: 'ES256' };
}

// Events the driver reads: grants by type, refresh-token reuse rejections.
export function newStats() {
  return {
    grants: {}, // grant_type -> successes
    byClient: {}, // client_id -> grant_type -> successes
    errors: [], // {grant_type, error, description, client}
    reuses: 0, // "refresh token already used" (a rotated token presented again)
    revokedGrants: 0,
    deviceCodes: [], // issued device codes: no output may contain one
  };
}

// The client certificate of a request on the TLS listener (none on plain HTTP).
function peerCertificate(ctx) {
  const raw = ctx.socket.getPeerCertificate?.()?.raw;
  return raw ? new crypto.X509Certificate(raw) : undefined;
}

// `mtls`: { port, key, cert, ca } for the TLS listener that asks for client
// certificates, verified against `ca`.
export async function startIdp({ port, redirectUris, mtls, stats = newStats(), log = () => {} }) {
  const issuer = `http://127.0.0.1:${port}`;
  const mtlsBase = mtls && `https://127.0.0.1:${mtls.port}`;
  const provider = new Provider(issuer, {
    clientAuthMethods: [
      'client_secret_basic',
      'client_secret_post',
      'private_key_jwt',
      'none',
      ...(mtls ? ['tls_client_auth'] : []),
    ],
    ...(mtls && {
      discovery: {
        mtls_endpoint_aliases: {
          token_endpoint: `${mtlsBase}/token`,
          introspection_endpoint: `${mtlsBase}/token/introspection`,
          revocation_endpoint: `${mtlsBase}/token/revocation`,
        },
      },
    }),
    clients: [
      {
        // tokenproxy's refresh_token credential, bootstrapped by `tokenproxy login`.
        client_id: CLIENTS.user.id,
        client_secret: CLIENTS.user.secret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: redirectUris,
      },
      {
        // The driver's own client, to prove the provider rejects a reused refresh token.
        client_id: CLIENTS.probe.id,
        client_secret: CLIENTS.probe.secret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/probe-callback'],
      },
      {
        // tokenproxy's client_credentials credential, for the resource RESOURCE.
        client_id: CLIENTS.machine.id,
        client_secret: CLIENTS.machine.secret,
        token_endpoint_auth_method: 'client_secret_post',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        scope: 'api:read',
      },
      {
        // tokenproxy's private_key_jwt credential (ES256 assertions), bootstrapped by login.
        client_id: CLIENTS.pkjwt.id,
        token_endpoint_auth_method: 'private_key_jwt',
        token_endpoint_auth_signing_alg: 'ES256',
        jwks: { keys: [publicJwk(PKJWT_KEY)] },
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: redirectUris,
      },
      ...(mtls
        ? [
            {
              // tokenproxy's tls_client_auth credential, bootstrapped by login.
              client_id: CLIENTS.mtls.id,
              token_endpoint_auth_method: 'tls_client_auth',
              tls_client_auth_subject_dn: CLIENTS.mtls.subject,
              grant_types: ['authorization_code', 'refresh_token'],
              response_types: ['code'],
              redirect_uris: redirectUris,
            },
          ]
        : []),
      {
        // tokenproxy's device-grant credential (client_secret_basic).
        client_id: CLIENTS.device.id,
        client_secret: CLIENTS.device.secret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
        response_types: [],
        redirect_uris: [],
      },
      {
        // tokenproxy's DPoP credential (auth method none, bound tokens).
        client_id: CLIENTS.dpop.id,
        token_endpoint_auth_method: 'none',
        dpop_bound_access_tokens: true,
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: redirectUris,
      },
      {
        // The upstream resource server: introspection only.
        client_id: CLIENTS.upstream.id,
        client_secret: CLIENTS.upstream.secret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: [],
        response_types: [],
        redirect_uris: [],
      },
    ],
    scopes: ['openid', 'offline_access', 'api:read'],
    pkce: { methods: ['S256'], required: () => true },
    // Every refresh returns a new refresh token and consumes the old one; a
    // consumed token presented again is rejected and revokes the grant.
    rotateRefreshToken: true,
    issueRefreshToken: async (ctx, client, code) =>
      client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
    ttl: {
      AccessToken: ACCESS_TTL,
      ClientCredentials: ACCESS_TTL,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
      IdToken: 600,
      RefreshToken: 3600,
    },
    cookies: { keys: ['interop-cookie-key-not-a-secret'] },
    features: {
      devInteractions: { enabled: true }, // plain-HTML login + consent forms
      introspection: { enabled: true },
      revocation: { enabled: true },
      clientCredentials: { enabled: true },
      deviceFlow: { enabled: true },
      mTLS: {
        enabled: Boolean(mtls),
        tlsClientAuth: Boolean(mtls),
        getCertificate: peerCertificate,
        // The TLS listener verified the chain against the suite's CA.
        certificateAuthorized: (ctx) => ctx.socket.authorized === true,
        certificateSubjectMatches: (ctx, property, expected) =>
          property === 'tls_client_auth_subject_dn' && peerCertificate(ctx)?.subject === expected,
      },
      // Nonces on every proof: each token request of a DPoP client first
      // meets use_dpop_nonce unless it already holds a current nonce.
      dPoP: { enabled: true, nonceSecret: crypto.randomBytes(32), requireNonce: () => true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, client, oneOf) => (oneOf ? oneOf[0] : undefined),
        useGrantedResource: async () => false,
        getResourceServerInfo: async (ctx, resourceIndicator, client) => {
          if (resourceIndicator === RESOURCE && client.clientId === CLIENTS.machine.id) {
            return {
              scope: 'api:read',
              audience: RESOURCE,
              accessTokenTTL: ACCESS_TTL,
              accessTokenFormat: 'opaque',
            };
          }
          throw new errors.InvalidTarget();
        },
      },
    },
  });

  provider.on('grant.success', (ctx) => {
    const gt = ctx.oidc.params.grant_type;
    stats.grants[gt] = (stats.grants[gt] || 0) + 1;
    const cid = ctx.oidc.client?.clientId;
    stats.byClient[cid] ??= {};
    stats.byClient[cid][gt] = (stats.byClient[cid][gt] || 0) + 1;
    log(`grant.success ${gt} client=${ctx.oidc.client?.clientId}`);
  });
  provider.on('grant.error', (ctx, err) => {
    const e = {
      grant_type: ctx.oidc?.params?.grant_type,
      error: err.error,
      description: err.error_description,
      detail: err.error_detail,
      client: ctx.oidc?.client?.clientId,
    };
    stats.errors.push(e);
    if (err.error === 'invalid_grant' && err.error_detail === 'refresh token already used') {
      stats.reuses += 1;
    }
    log(`grant.error ${JSON.stringify(e)}`);
  });
  provider.on('device_authorization.success', (ctx, body) => {
    stats.deviceCodes.push(body.device_code);
  });
  provider.on('grant.revoked', () => {
    stats.revokedGrants += 1;
  });
  provider.on('server_error', (ctx, err) => log(`server_error ${err.stack}`));

  const server = http.createServer(provider.callback());
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  let tlsServer;
  if (mtls) {
    // Asks every client for a certificate; oidc-provider decides (a client
    // without one is refused at client authentication, not in the handshake).
    tlsServer = https.createServer(
      { key: mtls.key, cert: mtls.cert, ca: mtls.ca, requestCert: true, rejectUnauthorized: false },
      provider.callback(),
    );
    await new Promise((resolve, reject) => {
      tlsServer.once('error', reject);
      tlsServer.listen(mtls.port, '127.0.0.1', resolve);
    });
  }
  return { provider, server, tlsServer, issuer, stats };
}

const b64urlJson = (s) => JSON.parse(Buffer.from(s, 'base64url').toString('utf8'));

// A DPoP proof for this request (RFC 9449 §4.3, §7.1), checked with node's
// own crypto: undefined when valid, else why not.
function checkProof(req, token, jkt, seenJti) {
  const proofs = req.headersDistinct?.dpop ?? (req.headers.dpop ? [req.headers.dpop] : []);
  if (proofs.length !== 1) return 'exactly one DPoP proof is required';
  const [h, p, sig] = proofs[0].split('.');
  let header;
  let claims;
  try {
    header = b64urlJson(h);
    claims = b64urlJson(p);
  } catch {
    return 'DPoP proof is not a JWT';
  }
  if (header.typ !== 'dpop+jwt') return 'typ';
  if (header.alg !== 'ES256' || header.jwk?.kty !== 'EC' || header.jwk.d) return 'alg or jwk';
  const { crv, kty, x, y } = header.jwk;
  const thumb = crypto.createHash('sha256').update(JSON.stringify({ crv, kty, x, y })).digest('base64url');
  if (thumb !== jkt) return 'the proof key is not the one the token is bound to';
  const key = crypto.createPublicKey({ key: header.jwk, format: 'jwk' });
  const ok = crypto.verify('sha256', Buffer.from(`${h}.${p}`), { key, dsaEncoding: 'ieee-p1363' }, Buffer.from(sig, 'base64url'));
  if (!ok) return 'signature';
  const htu = `http://${req.headers.host}${req.url.split('?')[0]}`;
  if (claims.htm !== req.method || claims.htu !== htu) return `htm/htu ${claims.htm} ${claims.htu}`;
  const ath = crypto.createHash('sha256').update(token).digest('base64url');
  if (claims.ath !== ath) return 'ath';
  if (Math.abs(claims.iat - Date.now() / 1000) > 60) return 'iat';
  if (!claims.jti || seenJti.has(claims.jti)) return 'jti missing or replayed';
  seenJti.add(claims.jti);
  return undefined;
}

// The resource server: each request's bearer token is introspected at the
// provider; unknown, revoked or expired tokens get 401 invalid_token.
export async function startUpstream({ port, issuer, log = () => {} }) {
  const stats = { served: 0, rejected: 0, dpopServed: 0, dpopRejected: [] };
  const seenJti = new Set();
  const basic = Buffer.from(
    `${encodeURIComponent(CLIENTS.upstream.id)}:${encodeURIComponent(CLIENTS.upstream.secret)}`,
  ).toString('base64');
  const server = http.createServer(async (req, res) => {
    const send = (status, body, headers = {}) => {
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(JSON.stringify(body));
    };
    try {
      const m = /^(Bearer|DPoP) ([\x21-\x7e]+)$/.exec(req.headers.authorization || '');
      if (!m) {
        stats.rejected += 1;
        return send(401, { error: 'invalid_request' }, { 'www-authenticate': 'Bearer' });
      }
      const r = await fetch(`${issuer}/token/introspection`, {
        method: 'POST',
        headers: {
          authorization: `Basic ${basic}`,
          'content-type': 'application/x-www-form-urlencoded',
        },
        body: new URLSearchParams({ token: m[2], token_type_hint: 'access_token' }),
      });
      const info = await r.json();
      const now = Math.floor(Date.now() / 1000);
      if (r.status !== 200 || !info.active || (info.exp && info.exp <= now)) {
        stats.rejected += 1;
        log(`upstream: 401 for ${req.url} (introspection ${r.status} active=${info.active})`);
        return send(
          401,
          { error: 'invalid_token' },
          { 'www-authenticate': 'Bearer error="invalid_token", error_description="token is not active"' },
        );
      }
      // RFC 9449 §7: a bound token needs the DPoP scheme and a proof of
      // this request signed with the bound key.
      const jkt = info.cnf?.jkt;
      if (jkt || m[1] === 'DPoP') {
        const why = jkt ? checkProof(req, m[2], jkt, seenJti) : 'DPoP scheme for an unbound token';
        const bad = m[1] !== 'DPoP' ? 'DPoP-bound token sent as a bearer token' : why;
        if (bad) {
          stats.rejected += 1;
          stats.dpopRejected.push(bad);
          log(`upstream: 401 for ${req.url}: ${bad}`);
          return send(401, { error: 'invalid_dpop_proof', error_description: bad }, {
            'www-authenticate': `DPoP error="invalid_dpop_proof", error_description="${bad}"`,
          });
        }
        stats.dpopServed += 1;
      }
      stats.served += 1;
      return send(200, {
        method: req.method,
        path: req.url,
        client_id: info.client_id,
        sub: info.sub,
        aud: info.aud,
        scope: info.scope,
        exp: info.exp,
      });
    } catch (e) {
      log(`upstream error: ${e.stack}`);
      return send(502, { error: 'introspection_failed', message: String(e) });
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  return { server, stats };
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const port = Number(process.argv[2] || 0);
  const upstreamPort = process.argv[3] ? Number(process.argv[3]) : undefined;
  const redirect = process.argv[4] || 'http://127.0.0.1:9901/callback';
  const { server, issuer } = await startIdp({
    port,
    redirectUris: [redirect],
    log: (l) => console.error(l),
  });
  const actual = server.address().port;
  if (upstreamPort !== undefined) {
    const up = await startUpstream({ port: upstreamPort, issuer: `http://127.0.0.1:${actual}` });
    console.log(`UPSTREAM ${up.server.address().port}`);
  }
  console.log(`READY ${actual}`);
  void issuer;
}
