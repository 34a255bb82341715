//! A token service of the kind distribution's `auth: token` trusts, taking a known time per token.
//!
//! It answers `GET realm?service=S&scope=repository:NAME:ACTIONS` (and the `POST` form of OAuth2
//! refresh requests) with `{"token": JWT, "access_token": JWT, "expires_in": 300}`, after sleeping
//! the delay it was given. The JWT is ES256-signed with a fresh P-256 key whose self-signed
//! certificate rides in the header's `x5c` and is the registry's `rootcertbundle`; it grants
//! whatever the scope asks. Every request and every token issued is kept, for the test to compare
//! with what regscope saw and to look for leaks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::net::{head_header, read_request_head};
use super::process::TempDir;

pub const SERVICE: &str = "regscope-test-registry";
pub const ISSUER: &str = "regscope-test-token-service";

/// A running token service; its thread ends with the test process.
pub struct TokenService {
    addr: SocketAddr,
    cert: PathBuf,
    seen: Arc<Mutex<Seen>>,
    _dir: TempDir,
}

#[derive(Default)]
struct Seen {
    requests: usize,
    tokens: Vec<String>,
}

impl TokenService {
    pub fn start(delay: Duration) -> TokenService {
        let dir = TempDir::new("token-service");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["regscope-token-service".into()]).unwrap().self_signed(&key).unwrap();
        let cert_path = dir.path().join("root.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let signer = Arc::new(Signer {
            key: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &SystemRandom::new())
                .unwrap(),
            x5c: base64(cert.der(), STANDARD),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (signer, seen) = (Arc::clone(&signer), Arc::clone(&shared));
                std::thread::spawn(move || serve(stream, &signer, &seen, delay));
            }
        });
        TokenService { addr, cert: cert_path, seen, _dir: dir }
    }

    /// The realm to configure in the registry: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The PEM file the registry's `rootcertbundle` names.
    pub fn root_cert(&self) -> PathBuf {
        self.cert.clone()
    }

    /// How many token requests it has answered.
    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().requests
    }

    /// Every token it issued.
    pub fn tokens(&self) -> Vec<String> {
        self.seen.lock().unwrap().tokens.clone()
    }
}

struct Signer {
    key: EcdsaKeyPair,
    x5c: String,
}

impl Signer {
    /// A JWT granting `scopes` (`repository:NAME:ACTIONS` each).
    fn token(&self, scopes: &[String]) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(serde_json::json!({ "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>() }))
            })
            .collect();
        let header = serde_json::json!({ "typ": "JWT", "alg": "ES256", "x5c": [self.x5c] });
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": "", "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", scopes.len()), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            base64(header.to_string().as_bytes(), URL_SAFE),
            base64(claims.to_string().as_bytes(), URL_SAFE)
        );
        let signature = self.key.sign(&SystemRandom::new(), signing_input.as_bytes()).unwrap();
        format!("{signing_input}.{}", base64(signature.as_ref(), URL_SAFE))
    }
}

/// Answers one connection's one request.
fn serve(stream: TcpStream, signer: &Signer, seen: &Mutex<Seen>, delay: Duration) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some((request_line, headers)) = read_request_head(&mut reader) else { return };
    let length: usize = head_header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let target = request_line.split(' ').nth(1).unwrap_or("/");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let form = String::from_utf8_lossy(&body);
    let scopes: Vec<String> =
        query.split('&').chain(form.split('&')).filter_map(|pair| pair.strip_prefix("scope=")).map(decode).collect();
    std::thread::sleep(delay);
    let token = signer.token(&scopes);
    {
        let mut seen = seen.lock().unwrap();
        seen.requests += 1;
        seen.tokens.push(token.clone());
    }
    let json = serde_json::json!({ "token": token, "access_token": token, "expires_in": 300 }).to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    let mut stream = stream;
    let _ = stream.write_all(response.as_bytes());
}

/// `%XX` and `+` decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const STANDARD: (&[u8; 64], bool) = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", true);
const URL_SAFE: (&[u8; 64], bool) = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", false);

/// Base64 with the given alphabet, padded or not (JWS wants URL-safe unpadded, `x5c` standard).
fn base64(bytes: &[u8], (alphabet, pad): (&[u8; 64], bool)) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let digits = chunk.len() + 1;
        for i in 0..4 {
            if i < digits {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}
