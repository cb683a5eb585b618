//! `sigv4`: AWS Signature Version 4 carried in the `Authorization` header — how the
//! SDKs sign requests, and what servers that check signatures expect (some refuse a
//! presigned URL for an ordinary request). `rusty-s3` builds each request as a
//! presigned URL; [`Signer::sign`] takes that URL's own query (the presigning
//! parameters dropped) and signs the same request in headers instead.
//!
//! The body is not hashed (`UNSIGNED-PAYLOAD`, as S3 allows): every PUT carries its
//! CRC32C (and its `Content-MD5` where the store may not check that: see
//! `s3::ContentMd5`), signed, which the server checks against the body.

use std::time::{SystemTime, UNIX_EPOCH};

use hyper::Method;
use ring::{digest, hmac};
use url::Url;

/// The query parameters of a presigned URL, which header signing does not send.
const PRESIGNING: [&str; 7] = [
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-signedheaders",
    "x-amz-signature",
    "x-amz-security-token",
];

/// What the body's hash is declared as.
pub(super) const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

/// Who signs, for which region.
pub(super) struct Signer<'a> {
    pub(super) access_key: &'a str,
    pub(super) secret_key: &'a str,
    pub(super) session_token: Option<&'a str>,
    pub(super) region: &'a str,
}

/// Percent-encodes as SigV4 wants: everything but `A-Z a-z 0-9 - _ . ~` (and `/` when
/// `slash` is false, for paths).
fn encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `%XX` escapes (anything malformed is kept as it is).
fn decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

/// `YYYYMMDD'T'HHMMSS'Z'` for `t` (UTC).
pub(super) fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The `Host` header the HTTP client sends for `url`.
fn host(url: &Url) -> String {
    let h = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    }
}

impl Signer<'_> {
    /// The request `presigned` stands for, signed in headers at `now`: the URL to send
    /// (its path and query in canonical form, so what is sent is what was signed) and
    /// the headers to send with `headers` (which are signed too).
    pub(super) fn sign(
        &self,
        method: &Method,
        presigned: &Url,
        headers: &[(&str, String)],
        now: SystemTime,
    ) -> (Url, Vec<(&'static str, String)>) {
        self.sign_with(method, presigned, headers, now, UNSIGNED)
    }

    /// [`Self::sign`] declaring the body's hash as `payload`.
    fn sign_with(
        &self,
        method: &Method,
        presigned: &Url,
        headers: &[(&str, String)],
        now: SystemTime,
        payload: &str,
    ) -> (Url, Vec<(&'static str, String)>) {
        let mut url = presigned.clone();
        let path = encode(&String::from_utf8_lossy(&decode(url.path())), false);
        let mut query: Vec<(String, String)> = presigned
            .query_pairs()
            .filter(|(k, _)| !PRESIGNING.contains(&k.to_ascii_lowercase().as_str()))
            .map(|(k, v)| (encode(&k, true), encode(&v, true)))
            .collect();
        query.sort();
        let query = query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        url.set_path(&path);
        url.set_query((!query.is_empty()).then_some(query.as_str()));
        let date = amz_date(now);
        let mut added: Vec<(&'static str, String)> = vec![
            ("x-amz-content-sha256", payload.to_string()),
            ("x-amz-date", date.clone()),
        ];
        if let Some(token) = self.session_token {
            added.push(("x-amz-security-token", token.to_string()));
        }
        let mut signed: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .chain(added.iter().map(|(k, v)| ((*k).to_string(), v.clone())))
            .chain(std::iter::once(("host".to_string(), host(&url))))
            .map(|(k, v)| (k, v.split_whitespace().collect::<Vec<_>>().join(" ")))
            .collect();
        signed.sort();
        let names = signed
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_headers: String = signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        // What is signed is what the URL will send.
        let canonical = format!(
            "{method}\n{path}\n{query}\n{canonical_headers}\n{names}\n{payload}",
            path = url.path(),
            query = url.query().unwrap_or_default(),
        );
        let day = &date[..8];
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let key = [day, self.region, "s3", "aws4_request"].iter().fold(
            format!("AWS4{}", self.secret_key).into_bytes(),
            |k, part| hmac_sha256(&k, part.as_bytes()).as_ref().to_vec(),
        );
        let signature = hex::encode(hmac_sha256(&key, to_sign.as_bytes()));
        added.push((
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, \
                 Signature={signature}",
                self.access_key
            ),
        ));
        (url, added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `Authorization` header among `headers`.
    fn authorization<'a>(headers: &'a [(&'static str, String)]) -> &'a str {
        headers
            .iter()
            .find(|(k, _)| *k == "authorization")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }

    /// The signer and the moment of AWS's documented examples.
    fn example() -> (Signer<'static>, SystemTime) {
        let signer = Signer {
            access_key: "AKIAIOSFODNN7EXAMPLE",
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            session_token: None,
            region: "us-east-1",
        };
        (
            signer,
            UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600),
        )
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        let at = |s: u64| amz_date(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(1_369_353_600), "20130524T000000Z");
        assert_eq!(at(951_782_400 + 3_723), "20000229T010203Z");
        assert_eq!(at(1_798_761_599), "20261231T235959Z");
    }

    #[test]
    fn paths_and_queries_encode_as_sigv4_wants() {
        assert_eq!(encode("a b/c~d+e", false), "a%20b/c~d%2Be");
        assert_eq!(encode("a/b=", true), "a%2Fb%3D");
        assert_eq!(decode("a%20b%2"), b"a b%2");
    }

    /// The example in AWS's documentation of header signing ("GET Object", the body's
    /// hash that of an empty body).
    #[test]
    fn the_documented_example_signs_alike() {
        let (signer, now) = example();
        let url = Url::parse("https://examplebucket.s3.amazonaws.com/test.txt").unwrap();
        let empty = sha256_hex(b"");
        let (_, headers) = signer.sign_with(
            &Method::GET,
            &url,
            &[("range", "bytes=0-9".to_string())],
            now,
            &empty,
        );
        let auth = authorization(&headers);
        assert!(
            auth.ends_with(
                "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
            ),
            "{auth}"
        );
    }

    /// A canonical request computed by hand from the pieces the signature covers,
    /// matching the signer's: a wrong piece changes the signature.
    #[test]
    fn the_signature_covers_method_path_query_headers_and_date() {
        let (signer, now) = example();
        let url = Url::parse(
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Signature=abc&X-Amz-Date=x",
        )
        .unwrap();
        let range = [("range", "bytes=0-9".to_string())];
        let (sent, headers) = signer.sign(&Method::GET, &url, &range, now);
        assert_eq!(
            sent.as_str(),
            "https://examplebucket.s3.amazonaws.com/test.txt"
        );
        let auth = authorization(&headers);
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/\
                 aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
                 Signature="
            ),
            "{auth}"
        );
        let sig = |m: &Method, h: &[(&str, String)], t: SystemTime| {
            let (_, hs) = signer.sign(m, &url, h, t);
            authorization(&hs).to_string()
        };
        let base = sig(&Method::GET, &range, now);
        assert_ne!(base, sig(&Method::HEAD, &range, now));
        assert_ne!(
            base,
            sig(&Method::GET, &[("range", "bytes=0-8".into())], now)
        );
        assert_ne!(
            base,
            sig(
                &Method::GET,
                &range,
                now + std::time::Duration::from_secs(1)
            )
        );
    }
}
