//! Credentials kept out of what postbox shows: the secrets of a server URL
//! ([`url_secrets`]), text with them replaced ([`scrub`]), and a URL fit to
//! print ([`redact`]). The stores on servers (Redis, PostgreSQL) and the
//! RabbitMQ backend build every error and log line of theirs through these.

/// What in a URL must not be shown: the user-info part (`user:password`),
/// its password (as written and percent-decoded), and `password=`/`pass=`
/// query values. The user info runs up to the last `@`: a malformed URL
/// may hold `/`, `?` or `#` unescaped in its password.
#[cfg(any(feature = "redis", feature = "amqp"))]
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    if let Some((userinfo, _host)) = rest.rsplit_once('@') {
        if let Some((_user, password)) = userinfo.split_once(':') {
            secrets.push(password.to_owned());
            secrets.push(percent_decode(password));
        }
        secrets.push(userinfo.to_owned());
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && matches!(name, "password" | "pass")
            {
                secrets.push(value.to_owned());
                secrets.push(percent_decode(value));
            }
        }
    }
    // Longest first, so that a password inside the user-info is not left
    // half-scrubbed.
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// `message` with every secret replaced by `***`.
pub(crate) fn scrub(message: impl Into<String>, secrets: &[String]) -> String {
    let mut message = message.into();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if message.contains(secret.as_str()) {
            message = message.replace(secret.as_str(), "***");
        }
    }
    message
}

/// `url` with the password of its user info replaced by `***` (the user
/// info running up to the last `@`, as in [`url_secrets`]).
#[cfg(feature = "amqp")]
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(any(feature = "redis", feature = "amqp"))]
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed() {
        assert_eq!(scrub("x hunter2 y", &["hunter2".into()]), "x *** y");
    }

    #[cfg(any(feature = "redis", feature = "amqp"))]
    #[test]
    fn secrets_of_urls_are_found_and_scrubbed() {
        let s = url_secrets("redis://alice:p%40ss@example.invalid:6380/2?password=q");
        let msg = scrub("auth alice:p%40ss failed, p@ss, q?", &s);
        assert!(!msg.contains("p%40ss") && !msg.contains("p@ss"), "{msg}");
        assert!(url_secrets("redis://127.0.0.1:6379").is_empty());
        // A password holding `/` unescaped is all found.
        let s = url_secrets("amqp://u:pa/ss@h/v");
        assert_eq!(scrub("pa/ss", &s), "***");
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn urls_are_redacted_up_to_the_last_at() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqps://u@h/v"), "amqps://u@h/v");
        assert_eq!(redact("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact("amqp://a:p@ss@h/x?y=1"), "amqp://a:***@h/x?y=1");
        assert_eq!(redact("amqp://u:pa/ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact("amqp://u:p?a#s@h/v"), "amqp://u:***@h/v");
    }
}
