//! The table of host forms that `tests/e2e_host_forms.rs` (standalone Envoy) and
//! `tests/e2e_istio.rs` (istiod's configuration) run against each configuration: the forms are
//! generated (case × trailing dots × ports × user info, plus lists and spaces), each must end
//! as the table says (refused before any provider sees it; served after the filter's rewrite
//! and after the authorization in front of it; or passed through untouched to a host that is
//! not an LLM host), and whatever the form, every request a provider receives was rewritten by
//! the filter and carries neither the client's credential nor the fallback marker.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::client::{Resp, SEED_BODY};
use super::mock::{self, MockServer, Recorded};
use super::raw::{send_h2, send_raw_from};

/// The client's own credential: it must never reach a provider.
pub const CLIENT_TOKEN: &str = "client-secret-3e1f";
pub const DENIED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The role a host plays in a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
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
pub enum Outcome {
    Refused(u16),
    Served,
    PassedThrough,
}

/// What the table expects for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Refused with this status (`None`: any 4xx).
    Refused(Option<u16>),
    Served,
    PassedThrough,
    /// Anything but served (a host the proxy has no route for: refused or dropped there).
    NotServed,
}

/// One generated form of a host, and whether it is one the filter serves: `host` or
/// `host:port` (any case, the port 1 to 5 digits, at most 65535). This oracle is written
/// apart from the filter's code on purpose.
pub struct Form {
    pub text: Vec<u8>,
    pub served: bool,
    /// A served form only where `host:port` is (`settings.hostWithPort`).
    pub with_port: bool,
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

pub fn forms(host: &str) -> Vec<Form> {
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
                        with_port: !port.is_empty(),
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
            with_port: false,
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
            with_port: false,
        });
    }
    out
}

/// One configuration under test, as one client sees it.
pub struct Target<'a> {
    pub name: String,
    pub addr: SocketAddr,
    pub provider: &'a MockServer,
    /// The shipped configs' plain upstream for other hosts; without it Envoy's own catch-all
    /// answers 404 `no route for this host` (the rendered bootstraps).
    pub local: Option<&'a MockServer>,
    pub source: Option<IpAddr>,
    /// Sent with every request (the client's `authorization` among them).
    pub headers: Vec<(String, String)>,
    /// The client's credential, which no provider may receive.
    pub credential: String,
    /// The rewritten calls a provider may receive: (`:authority`, path, key).
    pub calls: Vec<(&'a str, &'a str, &'a str)>,
    /// `host:port` is a served form (`settings.hostWithPort`, true but on Istio gateways).
    pub host_with_port: bool,
    /// Other hosts have nowhere to go (a sidecar without original destinations): any answer
    /// without a provider request counts as passed through.
    pub others_go_nowhere: bool,
}

impl<'a> Target<'a> {
    /// A client sending its own token (`CLIENT_TOKEN`) from 127.0.0.1 to the proxy at `addr`,
    /// whose providers may receive only `calls`; no local service, ports served.
    pub fn new(
        name: impl Into<String>,
        addr: SocketAddr,
        provider: &'a MockServer,
        calls: Vec<(&'a str, &'a str, &'a str)>,
    ) -> Target<'a> {
        Target {
            name: name.into(),
            addr,
            provider,
            local: None,
            source: None,
            headers: vec![bearer(CLIENT_TOKEN)],
            credential: CLIENT_TOKEN.to_string(),
            calls,
            others_go_nowhere: false,
            host_with_port: true,
        }
    }

    /// The same client and provider, for another proxy (override the fields that differ).
    pub fn clone_for(&self) -> Target<'a> {
        Target {
            name: self.name.clone(),
            addr: self.addr,
            provider: self.provider,
            local: self.local,
            source: self.source,
            headers: self.headers.clone(),
            credential: self.credential.clone(),
            calls: self.calls.clone(),
            others_go_nowhere: self.others_go_nowhere,
            host_with_port: self.host_with_port,
        }
    }

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
            (0, 0) if self.others_go_nowhere && !(400..500).contains(&resp.status) => {
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
    pub async fn send_http1(
        &self,
        label: &str,
        target: &[u8],
        hosts: &[&[u8]],
        effective: Option<&[u8]>,
    ) -> Outcome {
        let before = self.counts();
        let resp = send_raw_from(
            self.source,
            self.addr,
            self.head(target, hosts),
            vec![SEED_BODY.as_bytes().to_vec()],
        )
        .await;
        self.classify(label, effective, before, &resp)
    }

    /// The whole table for these hosts; `expect` gives the outcome for a host's kind when
    /// written in a served form (other forms that name an LLM host are always refused, and
    /// forms of other hosts pass through).
    pub async fn table(&self, hosts: &[(&str, Kind)], expect: impl Fn(Kind) -> Expect) {
        let mut served = 0;
        for (host, kind) in hosts {
            for mut form in forms(host) {
                form.served &= self.host_with_port || !form.with_port;
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
                    (Expect::NotServed, got) => got != Outcome::Served,
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
    pub async fn odd_forms(&self, llm: &str, other: &str) {
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
                self.addr,
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

pub fn bearer(token: &str) -> (String, String) {
    ("authorization".to_string(), format!("Bearer {token}"))
}
