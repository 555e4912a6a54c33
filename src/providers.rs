//! Provider profiles: one reviewed table of what tokenproxy knows about the
//! APIs people point it at (docs/providers.md). `provider = "NAME"` on a
//! credential fills each key the credential does not set itself.
//!
//! Data only: the engine's behaviour (error vocabularies, refresh-token
//! lifetimes, rate-limit headers) lives in `token::grant` and works without
//! a profile. Every row names the vendor pages its facts were taken from; a
//! fact that could not be checked against the vendor's own page is left out
//! rather than guessed (the row's `notes` say what to set by hand).

/// A value a provider's URLs are templated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// `{tenant}`: Microsoft's directory (a GUID, a domain, or
    /// `common`/`organizations`/`consumers`).
    Tenant,
    /// `{domain}`: the host of a tenant-specific IdP (a Keycloak server, an
    /// Okta org, an Auth0 tenant).
    Domain,
    /// `{realm}`: a Keycloak realm.
    Realm,
}

impl Param {
    pub fn key(self) -> &'static str {
        match self {
            Param::Tenant => "tenant",
            Param::Domain => "domain",
            Param::Realm => "realm",
        }
    }
}

/// Whether and how a provider rotates refresh tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Every refresh returns a new refresh token and spends the old one.
    Always,
    /// Rotation (and any reuse window) is a setting of the app at the
    /// provider: tokenproxy cannot know it, so `reuse_grace` stays 0 unless
    /// set to the app's value.
    AppSetting,
    /// Not verified against the vendor's documentation.
    Unverified,
}

impl Rotation {
    pub fn as_str(self) -> &'static str {
        match self {
            Rotation::Always => "every refresh (the old refresh token is spent)",
            Rotation::AppSetting => "an app setting at the provider",
            Rotation::Unverified => "not documented here",
        }
    }
}

/// How the refresh token's own lifetime (`refresh_expires_in` and its
/// spellings) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshLifetime {
    /// Each refresh starts it again (a session idle timeout): the engine
    /// refreshes before it runs out even when no request needs a token.
    Idle,
    /// Counts from the login whatever is refreshed: refreshing early
    /// would not help.
    Absolute,
}

impl RefreshLifetime {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshLifetime::Idle => "idle",
            RefreshLifetime::Absolute => "absolute",
        }
    }
}

/// One provider's row.
#[derive(Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    pub display: &'static str,
    /// What `{…}` in the URLs needs, in the order they appear.
    pub params: &'static [Param],
    /// `None`: not verified; the credential must set `token_url` or `issuer`.
    pub token_url: Option<&'static str>,
    pub authorize_url: Option<&'static str>,
    /// An `auth_method` value; `None`: the engine's default
    /// (`client_secret_basic`). A name, not the config's enum, so that
    /// `config` may use this module without a cycle.
    pub auth_method: Option<&'static str>,
    /// Sent on the authorization request by `login`.
    pub login_params: &'static [(&'static str, &'static str)],
    /// Send `scope` again on every refresh.
    pub scope_on_refresh: bool,
    pub rotation: Rotation,
    /// The documented reuse window, in seconds, when the provider fixes one
    /// (never an app setting: presenting a spent token after the real
    /// window revokes the family).
    pub reuse_grace_secs: u64,
    /// The documented access-token lifetime, for answers without `expires_in`.
    pub default_lifetime_secs: Option<u64>,
    /// Token-response values routes may use as `{token.NAME}`.
    pub token_fields: &'static [&'static str],
    /// The hosts those values may name (`.example.com`: any subdomain;
    /// a bare name: that host), as the vendor documents them; empty: any
    /// https origin. `token_field_hosts` in a credential overrides it.
    pub token_field_hosts: &'static [&'static str],
    /// `None`: the engine's default (idle).
    pub refresh_token_lifetime: Option<RefreshLifetime>,
    /// `token_type` values besides `Bearer` the provider documents for
    /// tokens used as bearer tokens.
    pub token_types: &'static [&'static str],
    /// A scope without which no refresh token is issued (`doctor` warns).
    pub offline_scope: Option<&'static str>,
    /// How the provider reports failures (what the engine recognises).
    pub errors: &'static str,
    /// What a user must know.
    pub notes: &'static [&'static str],
    /// The vendor pages the row was taken from.
    pub docs: &'static [&'static str],
}

impl Profile {
    /// `template` with `{tenant}`/`{domain}`/`{realm}` replaced; `None` when a
    /// value is missing.
    pub fn expand(
        &self,
        template: &str,
        value: &dyn Fn(Param) -> Option<String>,
    ) -> Option<String> {
        let mut out = template.to_owned();
        for p in self.params {
            let v = value(*p)?;
            out = out.replace(&format!("{{{}}}", p.key()), &v);
        }
        Some(out)
    }
}

/// Every profile, by name. Reviewed data: change a row only with the vendor
/// page that says so, and list it in `docs`.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "google",
        display: "Google",
        params: &[],
        // token_uri and auth_uri of the client JSON the Google Cloud console downloads.
        token_url: Some("https://oauth2.googleapis.com/token"),
        authorize_url: Some("https://accounts.google.com/o/oauth2/auth"),
        auth_method: None,
        login_params: &[("access_type", "offline"), ("prompt", "consent")],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors; a revoked or expired grant is invalid_grant.",
        notes: &[
            "A refresh token comes back only with access_type=offline and prompt=consent (login sends both).",
            "Apps whose OAuth consent screen is in \"Testing\" get refresh tokens that stop working after 7 days: publish the app to \"In production\".",
            "A refresh token unused for six months stops working.",
        ],
        docs: &[
            "https://developers.google.com/identity/protocols/oauth2/web-server#offline",
            "https://developers.google.com/identity/protocols/oauth2",
        ],
    },
    Profile {
        name: "microsoft",
        display: "Microsoft Entra ID (identity platform v2.0)",
        params: &[Param::Tenant],
        token_url: Some("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
        authorize_url: Some("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: true,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: Some("offline_access"),
        errors: "invalid_grant/invalid_client with AADSTS codes in error_codes and error_description: AADSTS70008 and AADSTS700082 (refresh token expired from inactivity), AADSTS50173 (grant revoked: credentials changed), AADSTS7000215 (invalid client secret).",
        notes: &[
            "Add offline_access to scopes, or no refresh token is issued.",
            "scope is sent again on every refresh (a refresh without it can fail with AADSTS90009 for some scopes).",
            "A refresh token unused for 90 days expires (AADSTS700082).",
        ],
        docs: &[
            "https://learn.microsoft.com/en-us/answers/questions/1080136/response-from-oauth2-v2-0-token-does-not-include-r",
            "https://learn.microsoft.com/en-us/answers/questions/192699/confusing-error-message-on-failed-refresh-token-re",
            "https://learn.microsoft.com/en-us/answers/questions/1338428/aadsts700082-the-refresh-token-has-expired-due-to",
            "https://docs.microsoft.com/en-us/azure/active-directory/develop/v2-oauth2-auth-code-flow",
        ],
    },
    Profile {
        name: "github",
        display: "GitHub App (user access tokens)",
        params: &[],
        token_url: Some("https://github.com/login/oauth/access_token"),
        authorize_url: Some("https://github.com/login/oauth/authorize"),
        auth_method: Some("client_secret_post"),
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Always,
        reuse_grace_secs: 0,
        default_lifetime_secs: Some(28_800),
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "Errors come with HTTP 200: error=bad_refresh_token (form-encoded unless JSON is asked for; tokenproxy asks). refresh_token_expires_in is sent.",
        notes: &[
            "The GitHub App must use user access tokens that expire (\"User-to-server token expiration\" under Optional features), or no refresh token is issued.",
            "User access tokens live 8 hours, refresh tokens 6 months; a used refresh token and the previous access token stop working at once.",
        ],
        docs: &[
            "https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens",
            // Read in its zh edition; the authorize URL is the same in every language.
            "https://docs.github.com/zh/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-user-access-token-for-a-github-app",
        ],
    },
    Profile {
        name: "okta",
        display: "Okta",
        params: &[Param::Domain],
        // The default custom authorization server: the one API access (and
        // the issuer in docs/providers.md) uses.
        token_url: Some("https://{domain}/oauth2/default/v1/token"),
        authorize_url: Some("https://{domain}/oauth2/default/v1/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::AppSetting,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: Some("offline_access"),
        errors: "RFC 6749 JSON errors; rate limits answer 429 with x-rate-limit-reset (epoch seconds), which tokenproxy honours.",
        notes: &[
            "domain is the Okta org's host (dev-123456.okta.com); the endpoints are its default custom authorization server's (/oauth2/default/v1/token and /oauth2/default/v1/authorize).",
            "For the org authorization server or another custom authorization server, set issuer to that server's issuer instead (discovery fills the endpoints) and leave domain out.",
            "Refresh token rotation and its grace period are app settings: set reuse_grace to the app's grace period, or leave it 0.",
            "Reuse of a rotated refresh token outside the grace period invalidates the most recent refresh token and every access token issued since the user authenticated.",
            "Add offline_access to scopes.",
        ],
        docs: &[
            "https://developer.okta.com/docs/guides/refresh-tokens/refresh-token-rotation/",
            "https://developer.okta.com/docs/guides/refresh-tokens/get-refresh-token/",
        ],
    },
    Profile {
        name: "auth0",
        display: "Auth0",
        params: &[Param::Domain],
        token_url: Some("https://{domain}/oauth/token"),
        authorize_url: Some("https://{domain}/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::AppSetting,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: Some("offline_access"),
        errors: "RFC 6749 JSON errors; an unknown or rotated-out refresh token is 403 invalid_grant \"Unknown or invalid refresh token.\"",
        notes: &[
            "domain is the tenant's domain (example.eu.auth0.com); or set issuer to https://<that domain>/ instead (discovery fills the endpoints).",
            "Refresh Token Rotation and its Reuse Interval (leeway, default 0) are application settings: set reuse_grace to the application's value, or leave it 0.",
            "Add offline_access to scopes, and audience when calling your own API.",
        ],
        docs: &[
            "https://auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-rotation",
            "https://auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-expiration",
            "https://auth0.com/docs/secure/tokens/refresh-tokens/get-refresh-tokens",
        ],
    },
    Profile {
        name: "keycloak",
        display: "Keycloak",
        params: &[Param::Domain, Param::Realm],
        token_url: Some("https://{domain}/realms/{realm}/protocol/openid-connect/token"),
        authorize_url: Some("https://{domain}/realms/{realm}/protocol/openid-connect/auth"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::AppSetting,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: Some(RefreshLifetime::Idle),
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors; refresh_expires_in says when the refresh token (the session) expires, and is recorded like refresh_token_expires_in.",
        notes: &[
            "A refresh token dies with its session: after SSO Session Idle (30 minutes by default) without a refresh, or SSO Session Max; ask for offline_access for an offline session instead.",
            "\"Revoke Refresh Token\" (realm Tokens settings) makes refresh tokens single-use.",
            "domain is the host (and port) of the Keycloak server; older servers under /auth need token_url and authorize_url set explicitly.",
        ],
        docs: &[
            "https://docs.redhat.com/zh-cn/documentation/red_hat_build_of_keycloak/26.0/html/server_administration_guide/timeouts",
            "https://www.keycloak.org/docs-api/latest/javadocs/org/keycloak/admin/client/token/TokenService.html",
            "https://keycloak.org/securing-apps/oidc-layers",
        ],
    },
    Profile {
        name: "cognito",
        display: "Amazon Cognito user pools",
        params: &[],
        token_url: None,
        authorize_url: None,
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::AppSetting,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Set issuer to the user pool's issuer (discovery fills the endpoints), or token_url and authorize_url to https://<user pool domain>/oauth2/token and /oauth2/authorize (a prefix domain such as mydomain.auth.us-east-1.amazoncognito.com, or your custom one).",
            "Refresh token rotation is an app client setting; its RetryGracePeriodSeconds (0 to 60) is the reuse window: set reuse_grace to it, or leave it 0.",
        ],
        docs: &[
            "https://docs.aws.amazon.com/cognito-user-identity-pools/latest/APIReference/API_RefreshTokenRotationType.html",
            "https://docs.aws.amazon.com/cognito/latest/developerguide/token-endpoint.html",
            "https://docs.aws.amazon.com/cognito/latest/developerguide/federation-endpoints.html",
        ],
    },
    Profile {
        name: "salesforce",
        display: "Salesforce",
        params: &[],
        token_url: Some("https://login.salesforce.com/services/oauth2/token"),
        authorize_url: Some("https://login.salesforce.com/services/oauth2/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::AppSetting,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &["instance_url"],
        // My Domain hosts (MyDomainName.my.salesforce.com), instanced ones
        // (eu55.salesforce.com) and org hosts on force.com
        // (MyDomainName--UAT.sandbox.lightning.force.com), per the pages
        // in `docs`; other suffixes (Government Cloud) were not confirmed.
        token_field_hosts: &[".salesforce.com", ".force.com"],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors. Token responses carry no expires_in: the access token lives as long as the org's session timeout.",
        notes: &[
            "The endpoints are login.salesforce.com's; for a My Domain (https://MyCompany.my.salesforce.com) or a sandbox (test.salesforce.com) set token_url and authorize_url to that host's /services/oauth2/token and /services/oauth2/authorize.",
            "No expires_in: set default_lifetime to the connected app's session timeout (or rely on refresh_on = [401]).",
            "Refresh token rotation is a connected-app setting; with it on, the previous refresh token is invalidated at once.",
            "The API host is the response's instance_url: route with upstream = \"{token.instance_url}/services/data/\" (it must be an https origin; until a grant has sent one, the route answers 503).",
        ],
        docs: &[
            "https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_refresh_token_flow.htm",
            "https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_oauth_endpoints.htm&language=en_US&type=5",
            "https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/intro_understanding_refresh_token_oauth.htm",
            "https://help.salesforce.com/apex/HTViewHelpDoc?id=domain_name_overview.htm&language=en_us",
            "https://help.salesforce.com/s/articleView?id=xcloud.domain_name_setting_login_policy.htm&language=en_US&type=5",
            "https://help.salesforce.com/apex/HTViewHelpDoc?id=xcloud.security_trusted_urls_external_redirections_orgs.htm",
        ],
    },
    Profile {
        name: "slack",
        display: "Slack (token rotation)",
        params: &[],
        token_url: Some("https://slack.com/api/oauth.v2.access"),
        authorize_url: Some("https://slack.com/oauth/v2/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Always,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &["bot", "user"],
        offline_scope: None,
        errors: "HTTP 200 with {\"ok\": false, \"error\": \"...\"}: invalid_refresh_token, invalid_client_id, bad_client_secret.",
        notes: &[
            "Token rotation must be enabled for the app, or Slack issues no refresh token; access tokens then expire every 12 hours.",
            "Slack prefers client_id and client_secret in HTTP Basic (the default auth_method).",
        ],
        docs: &[
            "https://docs.slack.dev/authentication/using-token-rotation",
            "https://docs.slack.dev/reference/methods/oauth.v2.access",
            // Slack's own copy of its OAuth v2 guide (api.slack.com's read here cut mid-URL).
            "https://api.slack-gov.com/authentication/oauth-v2",
        ],
    },
    Profile {
        name: "atlassian",
        display: "Atlassian Cloud (OAuth 2.0 3LO)",
        params: &[],
        token_url: Some("https://auth.atlassian.com/oauth/token"),
        authorize_url: Some("https://auth.atlassian.com/authorize"),
        auth_method: None,
        login_params: &[("audience", "api.atlassian.com")],
        scope_on_refresh: false,
        rotation: Rotation::Always,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: Some("offline_access"),
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Add offline_access to scopes, or no refresh token is issued.",
            "Refresh tokens rotate: each use issues a new, limited-life refresh token, and the one used is disabled.",
            "login sends audience=api.atlassian.com with the authorization request.",
        ],
        docs: &[
            "https://developer.atlassian.com/cloud/oauth/getting-started/refresh-tokens",
            "https://developer.atlassian.com/cloud/jira/platform/oauth-2-3lo-apps",
        ],
    },
    Profile {
        name: "xero",
        display: "Xero",
        params: &[],
        token_url: Some("https://identity.xero.com/connect/token"),
        authorize_url: Some("https://login.xero.com/identity/connect/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Always,
        // "you can retry refreshing your existing refresh token for a grace
        // period of 30 minutes" (developer.xero.com/faq/oauth2).
        reuse_grace_secs: 1800,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        // "Unused refresh tokens expire after 60 days."
        refresh_token_lifetime: Some(RefreshLifetime::Idle),
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Add offline_access to scopes.",
            "token_url is the tokenUrl of the OAuth2 security scheme in Xero's official OpenAPI descriptions (XeroAPI/Xero-OpenAPI), beside the authorizationUrl above.",
            "Each refresh returns a new refresh token; the previous one may be retried for 30 minutes (reuse_grace), and an unused one expires after 60 days (tokenproxy refreshes before then with no traffic).",
            "Access tokens live 30 minutes.",
        ],
        docs: &[
            "https://developer.xero.com/faq/oauth2",
            "https://developer.xero.com/documentation/oauth2/pkce-flow",
            "https://github.com/XeroAPI/Xero-OpenAPI/blob/master/xero-identity.yaml",
        ],
    },
    Profile {
        name: "hubspot",
        display: "HubSpot",
        params: &[],
        token_url: Some("https://api.hubapi.com/oauth/v1/token"),
        authorize_url: Some("https://app.hubspot.com/oauth/authorize"),
        auth_method: Some("client_secret_post"),
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "Errors have no `error` member: {\"status\": \"BAD_REFRESH_TOKEN\", \"message\": \"...\"} (tokenproxy reads status as the code).",
        notes: &[
            "client_id and client_secret go in the form body.",
            "Uninstalling the app from the HubSpot account revokes its refresh tokens (BAD_REFRESH_TOKEN).",
        ],
        docs: &[
            "https://developers.hubspot.com/docs/api-reference/legacy/authentication/oauth-tokens/v1/guide",
            "https://developers.hubspot.com/docs/api-reference/auth-oauth-v3/guide",
            "https://developers.hubspot.com/docs/apps/legacy-apps/authentication/working-with-oauth",
        ],
    },
    Profile {
        name: "zoom",
        display: "Zoom",
        params: &[],
        token_url: Some("https://zoom.us/oauth/token"),
        authorize_url: Some("https://zoom.us/oauth/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Access tokens live one hour. Server-to-Server OAuth apps get no refresh token: use grant = \"client_credentials\" only where Zoom documents it.",
        ],
        docs: &[
            "https://developers.zoom.us/docs/rooms/oauth/",
            "https://developers.zoom.us/docs/rooms/s2s-oauth/",
            "https://developer.zoom.us/docs/oauth/",
        ],
    },
    Profile {
        name: "intuit",
        display: "Intuit QuickBooks Online",
        params: &[],
        token_url: Some("https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"),
        authorize_url: Some("https://appcenter.intuit.com/connect/oauth2"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors; x_refresh_token_expires_in says how long the refresh token lives, and is recorded like refresh_token_expires_in.",
        notes: &[
            "Refresh tokens have a maximum validity of five years.",
        ],
        docs: &[
            "https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/faq",
            "https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-openid-discovery-doc",
        ],
    },
    Profile {
        name: "dropbox",
        display: "Dropbox",
        params: &[],
        token_url: Some("https://api.dropboxapi.com/oauth2/token"),
        authorize_url: Some("https://www.dropbox.com/oauth2/authorize"),
        auth_method: None,
        login_params: &[("token_access_type", "offline")],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Access tokens are short-lived; a refresh token is issued only for token_access_type=offline (login sends it).",
            "token_url is the token endpoint Dropbox's official SDKs call for codes and refresh tokens (dropbox-sdk-js OAuth2TokenUrl, dropbox-sdk-python refresh_access_token).",
        ],
        docs: &[
            "https://dropbox.tech/developers/using-oauth-2-0-with-offline-access",
            "https://github.com/dropbox/dropbox-sdk-js/blob/main/src/utils.js",
            "https://github.com/dropbox/dropbox-sdk-python/blob/main/dropbox/dropbox_client.py",
        ],
    },
    Profile {
        name: "box",
        display: "Box",
        params: &[],
        token_url: Some("https://api.box.com/oauth2/token"),
        authorize_url: Some("https://account.box.com/api/oauth2/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Always,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: None,
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors; an expired refresh token is invalid_grant \"Refresh token has expired\".",
        notes: &[
            "A refresh token is valid for 60 days and for one use: each refresh returns a new one.",
            "A credential unused for 60 days needs `tokenproxy login` again.",
        ],
        docs: &[
            "https://developer.box.com/guides/authentication/tokens/refresh",
            "https://developer.box.com/reference/get-authorize/",
        ],
    },
    Profile {
        name: "spotify",
        display: "Spotify",
        params: &[],
        token_url: Some("https://accounts.spotify.com/api/token"),
        authorize_url: Some("https://accounts.spotify.com/authorize"),
        auth_method: None,
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: Some(RefreshLifetime::Absolute),
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Refresh tokens expire 6 months after the user's authorization; refreshing does not extend that (invalid_grant then: run `tokenproxy login`).",
            "authorize_url is the /authorize endpoint of the authorization code flow, as in Spotify's example app for that guide (spotify/web-api-examples) and its Web API specification (spotify/web-api).",
        ],
        docs: &[
            "https://developer.spotify.com/blog/2026-06-18-refresh-token-expiration",
            "https://developer.spotify.com/documentation/web-api/tutorials/code-flow",
            "https://github.com/spotify/web-api-examples/blob/master/authorization/authorization_code/app.js",
            "https://github.com/spotify/web-api/blob/master/specifications/raml/api.raml",
        ],
    },
    Profile {
        name: "linkedin",
        display: "LinkedIn",
        params: &[],
        token_url: Some("https://www.linkedin.com/oauth/v2/accessToken"),
        authorize_url: Some("https://www.linkedin.com/oauth/v2/authorization"),
        auth_method: Some("client_secret_post"),
        login_params: &[],
        scope_on_refresh: false,
        rotation: Rotation::Unverified,
        reuse_grace_secs: 0,
        default_lifetime_secs: None,
        token_fields: &[],
        token_field_hosts: &[],
        refresh_token_lifetime: Some(RefreshLifetime::Absolute),
        token_types: &[],
        offline_scope: None,
        errors: "RFC 6749 JSON errors.",
        notes: &[
            "Programmatic refresh tokens are issued only to approved Marketing Developer Platform partners.",
            "Access tokens live 60 days; a refresh token lives 365 days from the first authorization and refreshing does not extend it (refresh_token_expires_in counts down).",
            "token_url is the accessToken endpoint of LinkedIn's client credential flow page, which LinkedIn's official API clients also call for authorization codes and refresh tokens; authorize_url is the member authorization URL those clients and LinkedIn's OAuth sample application build.",
            "auth_method is client_secret_post: LinkedIn's client credential flow (as its Talent job-postings basics page spells out) POSTs to accessToken form-encoded with grant_type, client_id and client_secret as parameters in the request body, not in an Authorization header; the same endpoint takes authorization codes and refresh tokens.",
        ],
        docs: &[
            "https://learn.microsoft.com/en-us/linkedin/shared/authentication/programmatic-refresh-tokens",
            "https://learn.microsoft.com/en-us/linkedin/shared/authentication/client-credentials-flow",
            "https://learn.microsoft.com/en-us/linkedin/talent/job-postings/api/job-posting-module1-basics",
            "https://learn.microsoft.com/en-us/linkedin/shared/development-resources/api-clients",
            "https://github.com/linkedin-developers/linkedin-api-python-client/blob/main/linkedin_api/common/constants.py",
            "https://github.com/linkedin-developers/java-sample-application/blob/main/server/src/main/java/com/linkedin/oauth/util/Constants.java",
        ],
    },
];

/// The profile called `name`.
pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Every name, in table order (for "expected one of").
pub fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}

/// `tokenproxy providers`: one line per profile.
pub fn list() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{:<12} {:<46} NEEDS", "NAME", "PROVIDER");
    for p in PROFILES {
        let needs: Vec<&str> = p.params.iter().map(|x| x.key()).collect();
        let _ = writeln!(
            s,
            "{:<12} {:<46} {}",
            p.name,
            p.display,
            if needs.is_empty() {
                "-".to_owned()
            } else {
                needs.join(", ")
            }
        );
    }
    s.push_str("\nSee `tokenproxy providers show NAME` and docs/providers.md.\n");
    s
}

/// `tokenproxy providers show NAME`: the effective settings, the notes and
/// the vendor pages.
pub fn show(p: &Profile) -> String {
    use std::fmt::Write;
    let or_unset = |v: Option<&str>| v.unwrap_or("(not filled: set it yourself)").to_owned();
    let mut s = String::new();
    let _ = writeln!(s, "{} ({})", p.display, p.name);
    if !p.params.is_empty() {
        let keys: Vec<String> = p
            .params
            .iter()
            .map(|x| format!("{} = \"...\"", x.key()))
            .collect();
        let _ = writeln!(s, "  needs:              {}", keys.join(", "));
    }
    let _ = writeln!(s, "  token_url:          {}", or_unset(p.token_url));
    let _ = writeln!(s, "  authorize_url:      {}", or_unset(p.authorize_url));
    let _ = writeln!(
        s,
        "  auth_method:        {}",
        p.auth_method.unwrap_or("client_secret_basic")
    );
    if !p.login_params.is_empty() {
        let lp: Vec<String> = p
            .login_params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "  login parameters:   {}", lp.join("&"));
    }
    let _ = writeln!(s, "  scope_on_refresh:   {}", p.scope_on_refresh);
    let _ = writeln!(s, "  rotation:           {}", p.rotation.as_str());
    if !p.token_types.is_empty() {
        let _ = writeln!(
            s,
            "  token_types:        Bearer, {}",
            p.token_types.join(", ")
        );
    }
    if let Some(l) = p.refresh_token_lifetime {
        let _ = writeln!(s, "  refresh_token_lifetime: {}", l.as_str());
    }
    let _ = writeln!(s, "  reuse_grace:        {}s", p.reuse_grace_secs);
    match p.default_lifetime_secs {
        Some(d) => {
            let _ = writeln!(s, "  default_lifetime:   {d}s");
        }
        None => {
            let _ = writeln!(s, "  default_lifetime:   (tokenproxy's default, 1h)");
        }
    }
    if !p.token_fields.is_empty() {
        let f: Vec<String> = p
            .token_fields
            .iter()
            .map(|f| format!("{{token.{f}}}"))
            .collect();
        let _ = writeln!(s, "  route values:       {}", f.join(", "));
    }
    if !p.token_field_hosts.is_empty() {
        let _ = writeln!(
            s,
            "  token_field_hosts:  {}",
            p.token_field_hosts.join(", ")
        );
    }
    let _ = writeln!(s, "  errors:             {}", p.errors);
    s.push_str("\nNotes:\n");
    for n in p.notes {
        let _ = writeln!(s, "  - {n}");
    }
    s.push_str("\nVendor documentation:\n");
    for d in p.docs {
        let _ = writeln!(s, "  {d}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_complete_and_cites_https_vendor_pages() {
        let mut seen = std::collections::HashSet::new();
        for p in PROFILES {
            assert!(seen.insert(p.name), "duplicate {}", p.name);
            assert!(!p.docs.is_empty(), "{} cites nothing", p.name);
            for d in p.docs {
                assert!(d.starts_with("https://"), "{}: {d}", p.name);
            }
            assert!(!p.notes.is_empty(), "{}", p.name);
            // Templates use exactly the params the row declares.
            for url in [p.token_url, p.authorize_url].into_iter().flatten() {
                assert!(url.starts_with("https://"), "{url}");
                for param in [Param::Tenant, Param::Domain, Param::Realm] {
                    let used = url.contains(&format!("{{{}}}", param.key()));
                    assert_eq!(used, p.params.contains(&param), "{}: {url}", p.name);
                }
            }
            for f in p.token_fields {
                assert!(
                    crate::token_fields::TokenField::parse(f).is_some(),
                    "{}: {f}",
                    p.name
                );
            }
            // Hosts only for rows with values, each a valid entry.
            if !p.token_field_hosts.is_empty() {
                assert!(!p.token_fields.is_empty(), "{}", p.name);
            }
            for h in p.token_field_hosts {
                assert_eq!(
                    crate::token_fields::host_pattern(h).as_deref(),
                    Ok(*h),
                    "{}",
                    p.name
                );
            }
            // A reuse window tokenproxy trusts must be the vendor's fixed one.
            if p.reuse_grace_secs > 0 {
                assert_eq!(p.rotation, Rotation::Always, "{}", p.name);
            }
        }
        assert_eq!(PROFILES.len(), 18);
    }

    #[test]
    fn expand_fills_every_param_or_none() {
        let kc = find("keycloak").unwrap();
        let url = kc
            .expand(kc.token_url.unwrap(), &|p| match p {
                Param::Domain => Some("sso.example.com".into()),
                Param::Realm => Some("apps".into()),
                Param::Tenant => None,
            })
            .unwrap();
        assert_eq!(
            url,
            "https://sso.example.com/realms/apps/protocol/openid-connect/token"
        );
        assert!(kc
            .expand(kc.token_url.unwrap(), &|p| (p == Param::Domain)
                .then(|| "x".into()))
            .is_none());
    }

    #[test]
    fn authorize_templates_expand_like_the_token_ones() {
        let value = |p: Param| {
            Some(match p {
                Param::Tenant => "contoso.onmicrosoft.com".into(),
                Param::Domain => "idp.example.com".into(),
                Param::Realm => "apps".into(),
            })
        };
        for (name, want) in [
            (
                "microsoft",
                "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize",
            ),
            (
                "keycloak",
                "https://idp.example.com/realms/apps/protocol/openid-connect/auth",
            ),
            (
                "okta",
                "https://idp.example.com/oauth2/default/v1/authorize",
            ),
            ("auth0", "https://idp.example.com/authorize"),
        ] {
            let p = find(name).unwrap();
            assert_eq!(p.expand(p.authorize_url.unwrap(), &value).unwrap(), want);
        }
        for (name, want) in [
            ("okta", "https://idp.example.com/oauth2/default/v1/token"),
            ("auth0", "https://idp.example.com/oauth/token"),
        ] {
            let p = find(name).unwrap();
            assert_eq!(p.expand(p.token_url.unwrap(), &value).unwrap(), want);
        }
        // Every template is left with nothing to fill once its params are given.
        for p in PROFILES {
            for url in [p.token_url, p.authorize_url].into_iter().flatten() {
                let out = p.expand(url, &value).unwrap();
                assert!(
                    !out.contains('{') && !out.contains('}'),
                    "{}: {out}",
                    p.name
                );
            }
        }
        // A missing tenant leaves the Microsoft authorize URL unfilled.
        let ms = find("microsoft").unwrap();
        assert!(ms.expand(ms.authorize_url.unwrap(), &|_| None).is_none());
    }

    #[test]
    fn list_and_show_name_what_a_user_needs() {
        let l = list();
        for p in PROFILES {
            assert!(l.contains(p.name));
        }
        assert!(l.contains("tenant"));
        let s = show(find("github").unwrap());
        assert!(s.contains("https://github.com/login/oauth/access_token"));
        assert!(s.contains("expiring") || s.contains("expire"));
        assert!(s.contains("docs.github.com"));
        assert!(s.contains("https://github.com/login/oauth/authorize"));
        assert!(!s.contains("not filled"), "{s}");
        // Filled from LinkedIn's own pages and official clients.
        let s = show(find("linkedin").unwrap());
        assert!(
            s.contains("token_url:          https://www.linkedin.com/oauth/v2/accessToken"),
            "{s}"
        );
        assert!(
            s.contains("authorize_url:      https://www.linkedin.com/oauth/v2/authorization"),
            "{s}"
        );
        assert!(!s.contains("not filled"), "{s}");
        // Its pages send the client secret in the form body.
        assert!(s.contains("auth_method:        client_secret_post"), "{s}");
        // A gap the table could not fill still says so (Cognito's endpoints
        // live on each user pool's own domain).
        let s = show(find("cognito").unwrap());
        assert!(s.contains("token_url:          (not filled"), "{s}");
        assert!(s.contains("authorize_url:      (not filled"), "{s}");
        let s = show(find("okta").unwrap());
        assert!(s.contains("domain = \"...\""), "{s}");
    }
}
