#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every form of a host a client can write, against every shipped configuration (mesh, gateway
//! with the seed's RBAC DENY, JWT, ext_authz, `apiKeyFile`, fallback), in real Envoy with the
//! release filter. The forms are generated: case × trailing dots × ports (none, empty,
//! numeric, zero-padded, signed, oversized, not a number, two ports, a space) × user info, for
//! route hosts, provider hosts and a host the manifests do not name; plus two `Host` headers,
//! absolute-form request targets and HTTP/2 `:authority` against a `host` header.
//!
//! Each request ends in one of three ways, and the table says which one each form must get:
//! refused before any provider sees it; served after the filter's rewrite and after the
//! authorization in front of it; or passed through, untouched, to a host that is not an LLM
//! host. Whatever the form, every request a provider receives was rewritten by the filter
//! (its path, `:authority`, key), carries neither the client's credential nor the fallback
//! marker, and comes from a client the authorization let through.

mod support;

use std::net::{IpAddr, Ipv4Addr};

use support::client::{Resp, SEED_BODY};
use support::envoy::Envoy;
use support::mock::{Behavior, FixedReply, MockServer, Recorded};
use support::raw::{send_h2, send_raw_from};
use support::*;

/// The client's own credential: it must never reach a provider.
const CLIENT_TOKEN: &str = "client-secret-3e1f";
const DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The role a host plays in a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An `LLMRoute` host.
    Route,
    /// An `LLMProvider`'s own host that clients may call.
    Provider,
    /// A provider's host on a gateway, which serves providers only through its routes.
    GatewayProvider,
    /// Not an LLM host.
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Refused(u16),
    Served,
    PassedThrough,
}

/// What the table expects for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Refused with this status (`None`: any 4xx).
    Refused(Option<u16>),
    Served,
    PassedThrough,
}

/// One generated form of a host, and whether it is one the filter serves: `host` or
/// `host:port` (any case, the port 1 to 5 digits, at most 65535). This oracle is written
/// apart from the filter's code on purpose.
struct Form {
    text: Vec<u8>,
    served: bool,
}

const PORTS: [(&str, bool); 15] = [
    ("", true),
    (":", false),
    (":80", true),
    (":0", true),
    (":65535", true),
    (":00080", true),
    (":x", false),
    (":8o", false),
    (":+80", false),
    (":-80", false),
    (":65536", false),
    (":123456", false),
    (":99999999999", false),
    (":80:80", false),
    (": 80", false),
];

fn forms(host: &str) -> Vec<Form> {
    let mixed: String = host
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let mut out = Vec::new();
    for case in [host.to_string(), mixed] {
        for dots in ["", ".", ".."] {
            for (port, port_ok) in PORTS {
                for userinfo in ["", "u@", "u:p@"] {
                    out.push(Form {
                        text: format!("{userinfo}{case}{dots}{port}").into_bytes(),
                        served: userinfo.is_empty() && dots.is_empty() && port_ok,
                    });
                }
            }
        }
    }
    // Spaces around a header value are not part of it (HTTP's optional whitespace): Envoy,
    // its authorization filters and the filter all see the bare host.
    for text in [format!(" {host}"), format!("{host}\t")] {
        out.push(Form {
            text: text.into_bytes(),
            served: true,
        });
    }
    for text in [
        format!("example.com,{host}"),
        format!("{host},example.com"),
        format!("{host}:80,{host}"),
    ] {
        out.push(Form {
            text: text.into_bytes(),
            served: false,
        });
    }
    out
}

/// One configuration under test, as one client sees it.
struct Target<'a> {
    name: &'a str,
    envoy: &'a Envoy,
    provider: &'a MockServer,
    /// The shipped configs' plain upstream for other hosts; without it Envoy's own catch-all
    /// answers 404 `no route for this host` (the rendered bootstraps).
    local: Option<&'a MockServer>,
    source: Option<IpAddr>,
    /// Sent with every request (the client's `authorization` among them).
    headers: Vec<(String, String)>,
    /// The client's credential, which no provider may receive.
    credential: String,
    /// The rewritten calls a provider may receive: (`:authority`, path, key).
    calls: Vec<(&'a str, &'a str, &'a str)>,
}

impl Target<'_> {
    fn counts(&self) -> (usize, usize) {
        (
            self.provider.all_requests().len(),
            self.local.map_or(0, |l| l.all_requests().len()),
        )
    }

    fn check_provider_requests(&self, label: &str, new: &[Recorded]) {
        for r in new {
            let bearer = r.header("authorization").unwrap_or_default();
            let call = self.calls.iter().find(|(authority, path, key)| {
                r.authority.as_deref() == Some(*authority)
                    && r.path == *path
                    && bearer == format!("Bearer {key}")
            });
            assert!(
                call.is_some(),
                "{}: {label}: a provider received a request the filter did not rewrite: \
                 {} {} (authority {:?}, authorization {:?})",
                self.name,
                r.method,
                r.path,
                r.authority,
                mock::redact(&bearer)
            );
            assert_eq!(r.header_count("authorization"), 1, "{}: {label}", self.name);
            assert_eq!(r.method, "POST", "{}: {label}", self.name);
            assert!(
                r.header("x-llm-fallback").is_none(),
                "{}: {label}: the marker reached a provider",
                self.name
            );
            for (name, value) in &r.headers {
                assert!(
                    !String::from_utf8_lossy(value).contains(&self.credential),
                    "{}: {label}: the client's credential reached a provider in {name}",
                    self.name
                );
            }
            assert!(
                r.complete,
                "{}: {label}: an incomplete provider request",
                self.name
            );
        }
    }

    fn check_local_requests(&self, label: &str, sent_authority: Option<&[u8]>, new: &[Recorded]) {
        for r in new {
            let keys: Vec<&str> = self.calls.iter().map(|(_, _, k)| *k).collect();
            let auth = r.header("authorization").unwrap_or_default();
            assert!(
                !keys.iter().any(|k| auth.contains(k)),
                "{}: {label}: a provider key reached a host that is not a provider: {} {} \
                 (authority {:?})",
                self.name,
                r.method,
                r.path,
                r.authority
            );
            if let Some(sent) = sent_authority {
                assert_eq!(
                    r.authority.as_deref().map(str::as_bytes),
                    Some(sent.trim_ascii()),
                    "{}: {label}: a passed-through request's host was changed",
                    self.name
                );
            }
            assert_eq!(r.path, "/", "{}: {label}: path changed", self.name);
        }
    }

    /// Sends a request and says what became of it, checking every request a provider or
    /// the local service received for it.
    fn classify(
        &self,
        label: &str,
        sent_authority: Option<&[u8]>,
        before: (usize, usize),
        resp: &Resp,
    ) -> Outcome {
        let provider = self.provider.all_requests();
        let new_provider = &provider[before.0..];
        self.check_provider_requests(label, new_provider);
        let local = self.local.map(|l| l.all_requests()).unwrap_or_default();
        let new_local = &local[before.1.min(local.len())..];
        self.check_local_requests(label, sent_authority, new_local);
        match (new_provider.len(), new_local.len()) {
            (0, 0) if resp.status == 404 && resp.text() == "no route for this host\n" => {
                Outcome::PassedThrough
            }
            (0, 0) => {
                assert!(
                    (400..500).contains(&resp.status),
                    "{}: {label}: neither served nor refused: {} {}",
                    self.name,
                    resp.status,
                    resp.text()
                );
                Outcome::Refused(resp.status)
            }
            (1, 0) => {
                assert_eq!(resp.status, 200, "{}: {label}: {}", self.name, resp.text());
                Outcome::Served
            }
            (0, 1) => {
                assert_eq!(resp.status, 200, "{}: {label}: {}", self.name, resp.text());
                Outcome::PassedThrough
            }
            (p, l) => panic!(
                "{}: {label}: {p} provider and {l} local requests for one request",
                self.name
            ),
        }
    }

    fn head(&self, target: &[u8], hosts: &[&[u8]]) -> Vec<u8> {
        let mut head = b"POST ".to_vec();
        head.extend_from_slice(target);
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for host in hosts {
            head.extend_from_slice(b"host: ");
            head.extend_from_slice(host);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"content-type: application/json\r\nconnection: close\r\n");
        head.extend_from_slice(format!("content-length: {}\r\n", SEED_BODY.len()).as_bytes());
        for (name, value) in &self.headers {
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    /// `effective`: the host Envoy must pass on if the request goes elsewhere untouched
    /// (`None` when the request leaves that open, e.g. two `Host` headers).
    async fn send_http1(
        &self,
        label: &str,
        target: &[u8],
        hosts: &[&[u8]],
        effective: Option<&[u8]>,
    ) -> Outcome {
        let before = self.counts();
        let resp = send_raw_from(
            self.source,
            self.envoy.addr,
            self.head(target, hosts),
            vec![SEED_BODY.as_bytes().to_vec()],
        )
        .await;
        self.classify(label, effective, before, &resp)
    }

    /// The whole table for these hosts; `expect` gives the outcome for a host's kind when
    /// written in a served form (other forms that name an LLM host are always refused, and
    /// forms of other hosts pass through).
    async fn table(&self, hosts: &[(&str, Kind)], expect: impl Fn(Kind) -> Expect) {
        let mut served = 0;
        for (host, kind) in hosts {
            for form in forms(host) {
                let label = format!("Host {:?}", String::from_utf8_lossy(&form.text));
                let wanted = match kind {
                    Kind::Other => expect(Kind::Other),
                    _ if form.served => expect(*kind),
                    _ => Expect::Refused(None),
                };
                let got = self
                    .send_http1(&label, b"/", &[&form.text], Some(&form.text))
                    .await;
                let ok = match (wanted, got) {
                    (Expect::Refused(None), Outcome::Refused(_)) => true,
                    // Envoy's codec refuses some malformed hosts before any filter runs.
                    (Expect::Refused(Some(s)), Outcome::Refused(t)) => {
                        s == t || (t == 400 && !form.served)
                    }
                    // Envoy itself may refuse a malformed host of any kind.
                    (Expect::PassedThrough, Outcome::Refused(400)) => !form.served,
                    (want, got) => matches!(
                        (want, got),
                        (Expect::Served, Outcome::Served)
                            | (Expect::PassedThrough, Outcome::PassedThrough)
                    ),
                };
                assert!(
                    ok,
                    "{}: {label} ({kind:?}): expected {wanted:?}, got {got:?}",
                    self.name
                );
                served += usize::from(got == Outcome::Served);
            }
        }
        if hosts.iter().any(|(_, k)| expect(*k) == Expect::Served) {
            assert!(served > 0, "{}: no form was served at all", self.name);
        }
    }

    /// Forms no single `Host` value can express: two `Host` headers, absolute-form targets
    /// that name another host than `Host`, HTTP/2 `:authority` against a `host` header. The
    /// outcome may be any of the three, but every check on what reached a provider holds.
    async fn odd_forms(&self, llm: &str, other: &str) {
        let (l, o) = (llm.as_bytes(), other.as_bytes());
        for (label, target, hosts) in [
            ("two Host headers, LLM first", b"/".to_vec(), vec![l, o]),
            ("two Host headers, LLM second", b"/".to_vec(), vec![o, l]),
            ("two identical Host headers", b"/".to_vec(), vec![l, l]),
            (
                "absolute-form to the LLM host",
                format!("http://{llm}/").into_bytes(),
                vec![o],
            ),
            (
                "absolute-form to the other host",
                format!("http://{other}/").into_bytes(),
                vec![l],
            ),
            (
                "absolute-form with user info",
                format!("http://u@{llm}/").into_bytes(),
                vec![l],
            ),
            (
                "absolute-form with a bad port",
                format!("http://{llm}:x/").into_bytes(),
                vec![l],
            ),
        ] {
            self.send_http1(label, &target, &hosts, None).await;
        }
        for (label, authority, host) in [
            ("h2 :authority only", llm, None),
            ("h2 :authority LLM, host other", llm, Some(other)),
            ("h2 :authority other, host LLM", other, Some(llm)),
        ] {
            let before = self.counts();
            let headers: Vec<(&str, &str)> = self
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let resp = send_h2(
                self.source,
                self.envoy.addr,
                authority,
                host,
                &headers,
                SEED_BODY.as_bytes(),
            )
            .await;
            // A `host` header beside `:authority` may reach another host as it was sent.
            let outcome = self.classify(label, None, before, &resp);
            if host.is_none() {
                assert_ne!(
                    outcome,
                    Outcome::PassedThrough,
                    "{}: {label}: an LLM host passed through",
                    self.name
                );
            }
        }
    }
}

fn bearer(token: &str) -> (String, String) {
    ("authorization".to_string(), format!("Bearer {token}"))
}

/// Seed 001's mesh: route hosts, a provider host, and one the manifests do not name.
#[tokio::test]
async fn mesh() {
    let s = Stack::start("mesh.yaml");
    let t = Target {
        name: "mesh.yaml",
        envoy: &s.envoy,
        provider: &s.provider,
        local: Some(&s.local),
        source: None,
        headers: vec![bearer(CLIENT_TOKEN)],
        credential: CLIENT_TOKEN.to_string(),
        calls: vec![
            (DASHSCOPE, DASHSCOPE_PATH, KEY_DASHSCOPE),
            (MOONSHOT, MOONSHOT_PATH, KEY_MOONSHOT),
        ],
    };
    let hosts = [
        ("demo-llm-server", Kind::Route),
        ("demo-llm-server.default.svc.cluster.local", Kind::Route),
        (DASHSCOPE, Kind::Route),
        (MOONSHOT, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    t.table(&hosts, |kind| match kind {
        Kind::Other => Expect::PassedThrough,
        _ => Expect::Served,
    })
    .await;
    t.odd_forms("demo-llm-server", "example.com").await;
    t.odd_forms(MOONSHOT, "example.com").await;
}

/// Seed 000's gateway with its AuthorizationPolicy (DENY 127.0.0.2 for test.com) as RBAC:
/// no form of test.com gets past it, and the provider's own host is not served at all.
#[tokio::test]
async fn gateway_with_rbac_deny() {
    let s = Stack::start("gateway.yaml");
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for (source, denied) in [(None, false), (Some(DENIED), true)] {
        let t = Target {
            name: if denied {
                "gateway.yaml from 127.0.0.2"
            } else {
                "gateway.yaml"
            },
            envoy: &s.envoy,
            provider: &s.provider,
            local: Some(&s.local),
            source,
            headers: vec![bearer(CLIENT_TOKEN)],
            credential: CLIENT_TOKEN.to_string(),
            calls: vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
        };
        let before = s.provider.all_requests().len();
        t.table(&hosts, |kind| match (kind, denied) {
            (Kind::Route, false) => Expect::Served,
            (Kind::Route, true) => Expect::Refused(Some(403)),
            (Kind::GatewayProvider, _) => Expect::Refused(Some(404)),
            _ => Expect::PassedThrough,
        })
        .await;
        t.odd_forms("test.com", "example.com").await;
        if denied {
            let reached: Vec<String> = s.provider.all_requests()[before..]
                .iter()
                .map(|r| format!("{} {} {:?}", r.method, r.path, r.authority))
                .collect();
            assert!(
                reached.is_empty(),
                "a denied client reached the provider: {reached:?}"
            );
        }
    }
}

/// The JWT gateway: without a valid token no form of test.com reaches the provider; with
/// one, the served forms do, and the token stays behind.
#[tokio::test]
async fn jwt_gateway() {
    let s = Stack::start("jwt.yaml");
    let token = jwt::sign(&jwt::claims("alice"));
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for (credential, valid) in [(CLIENT_TOKEN.to_string(), false), (token, true)] {
        let t = Target {
            name: if valid {
                "jwt.yaml with a valid token"
            } else {
                "jwt.yaml without a valid token"
            },
            envoy: &s.envoy,
            provider: &s.provider,
            local: Some(&s.local),
            source: None,
            headers: vec![bearer(&credential)],
            credential: credential.clone(),
            calls: vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
        };
        let before = s.provider.all_requests().len();
        t.table(&hosts, |kind| match (kind, valid) {
            (Kind::Route, true) => Expect::Served,
            (Kind::Route, false) => Expect::Refused(Some(401)),
            (Kind::GatewayProvider, _) => Expect::Refused(Some(404)),
            _ => Expect::PassedThrough,
        })
        .await;
        t.odd_forms("test.com", "example.com").await;
        if !valid {
            assert_eq!(
                s.provider.all_requests().len(),
                before,
                "a request without a valid JWT reached the provider"
            );
        }
    }
}

/// The ext_authz gateway: while the service denies, nothing reaches the provider in any form;
/// once it allows, the table is the gateway's.
#[tokio::test]
async fn ext_authz_gateway() {
    let s = Stack::builder("ext-authz.yaml")
        .plain_cluster("ext-authz")
        .start();
    let authz = s.mock("ext-authz");
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::GatewayProvider),
        ("example.com", Kind::Other),
    ];
    for allowed in [false, true] {
        authz.set_behavior(if allowed {
            Behavior::default()
        } else {
            Behavior {
                fixed: Some(FixedReply {
                    status: 403,
                    content_type: "text/plain".into(),
                    body: b"denied".to_vec(),
                }),
                ..Behavior::default()
            }
        });
        let t = Target {
            name: if allowed {
                "ext-authz.yaml, allowed"
            } else {
                "ext-authz.yaml, denied"
            },
            envoy: &s.envoy,
            provider: &s.provider,
            local: Some(&s.local),
            source: None,
            headers: vec![bearer(CLIENT_TOKEN)],
            credential: CLIENT_TOKEN.to_string(),
            calls: vec![(DASHSCOPE, DASHSCOPE_PATH, KEY_GATEWAY)],
        };
        let before = s.provider.all_requests().len();
        t.table(&hosts, |kind| match (kind, allowed) {
            (_, false) => Expect::Refused(Some(403)),
            (Kind::Route, true) => Expect::Served,
            (Kind::GatewayProvider, true) => Expect::Refused(Some(404)),
            _ => Expect::PassedThrough,
        })
        .await;
        t.odd_forms("test.com", "example.com").await;
        if !allowed {
            assert_eq!(
                s.provider.all_requests().len(),
                before,
                "a request the authorization service denied reached the provider"
            );
        }
    }
}

const KEY_FILE_MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKeyFile: KEY_FILE}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: keys-route}
spec:
  host: test.com
  rules:
  - backendRefs:
    - providerHost: dashscope.aliyuncs.com
";

/// `apiKeyFile`: Envoy's credential injector adds the key on the provider's cluster, after
/// routing. Only requests the filter rewrote reach that cluster, so the key goes out only on
/// the provider's own path, whatever path or host form the client chose.
#[tokio::test]
async fn api_key_file() {
    const KEY: &str = "sk-key-file-4d2c";
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let dir = support::envoy::temp_dir("host-forms-key-file");
    let key_file = dir.join("dashscope-key");
    std::fs::write(&key_file, KEY).unwrap();
    let manifests = KEY_FILE_MANIFESTS.replace("KEY_FILE", &key_file.display().to_string());
    let yaml = render_envoy(
        "host-forms-key-file",
        &manifests,
        &[(DASHSCOPE, provider.addr())],
    );
    let envoy = Envoy::start(&yaml, "host-forms-key-file");
    let t = Target {
        name: "apiKeyFile",
        envoy: &envoy,
        provider: &provider,
        local: None,
        source: None,
        headers: vec![bearer(CLIENT_TOKEN)],
        credential: CLIENT_TOKEN.to_string(),
        calls: vec![(DASHSCOPE, DASHSCOPE_PATH, KEY)],
    };
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    t.table(&hosts, |kind| match kind {
        Kind::Other => Expect::PassedThrough,
        _ => Expect::Served,
    })
    .await;
    t.odd_forms(DASHSCOPE, "example.com").await;
    // The attack this closes: a host form the filter does not serve, on a path of the
    // client's choosing, once got the provider key injected.
    let before = provider.all_requests().len();
    for path in [b"/v1/files".as_slice(), b"/anything"] {
        let outcome = t
            .send_http1(
                "a provider host with a bad port, another path",
                path,
                &[b"dashscope.aliyuncs.com:x"],
                Some(b"dashscope.aliyuncs.com:x"),
            )
            .await;
        assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
    }
    assert_eq!(provider.all_requests().len(), before);
}

const FALLBACK_MANIFESTS: &str = "\
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope-qwen}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: qwen-turbo, apiKey: sk-forms-dashscope}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot}
spec:
  host: api.moonshot.cn
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: moonshot-v1-8k, apiKey: sk-forms-moonshot}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: ha-route}
spec:
  host: test.com
  rules:
  - name: ha
    backendRefs:
    - providerHost: dashscope.aliyuncs.com
    fallback:
      providers: [api.moonshot.cn]
";

/// A fallback rule, with the client sending the fallback marker itself on every request: it
/// never steers a request into the fallback route, and never reaches a provider.
#[tokio::test]
async fn fallback() {
    let provider = MockServer::start_tls(&pki().0).expect("mock provider");
    let yaml = render_envoy(
        "host-forms-fallback",
        FALLBACK_MANIFESTS,
        &[(DASHSCOPE, provider.addr()), (MOONSHOT, provider.addr())],
    );
    let envoy = Envoy::start(&yaml, "host-forms-fallback");
    let t = Target {
        name: "fallback",
        envoy: &envoy,
        provider: &provider,
        local: None,
        source: None,
        headers: vec![
            bearer(CLIENT_TOKEN),
            (
                "x-llm-fallback".to_string(),
                "default/ha-route/0".to_string(),
            ),
        ],
        credential: CLIENT_TOKEN.to_string(),
        calls: vec![
            (DASHSCOPE, DASHSCOPE_PATH, "sk-forms-dashscope"),
            (MOONSHOT, MOONSHOT_PATH, "sk-forms-moonshot"),
        ],
    };
    let hosts = [
        ("test.com", Kind::Route),
        (DASHSCOPE, Kind::Provider),
        (MOONSHOT, Kind::Provider),
        ("example.com", Kind::Other),
    ];
    t.table(&hosts, |kind| match kind {
        Kind::Other => Expect::PassedThrough,
        _ => Expect::Served,
    })
    .await;
    t.odd_forms("test.com", "example.com").await;
}

/// The oracle itself: the forms it calls served are exactly `host` or `host:port`.
#[test]
fn generated_forms_cover_each_class() {
    let all = forms("test.com");
    assert!(all.len() > 250, "{}", all.len());
    let served: Vec<String> = all
        .iter()
        .filter(|f| f.served)
        .map(|f| String::from_utf8_lossy(&f.text).to_string())
        .collect();
    assert_eq!(served.len(), 2 * 5 + 2, "{served:?}");
    assert!(served.contains(&"TeSt.cOm:00080".to_string()), "{served:?}");
}
