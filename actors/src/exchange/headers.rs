//! Headers-exchange bindings: match on message headers instead of the routing
//! key, as RabbitMQ's headers exchange does.

use bytestring::ByteString;

use crate::envelope::{HeaderValue, Headers};

/// How many of a binding's headers must match, and whether headers named
/// `x-...` take part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum XMatch {
    /// Every header of the binding (`x-match: all`), `x-` ones aside.
    #[default]
    All,
    /// At least one (`x-match: any`), `x-` ones aside.
    Any,
    /// Every header of the binding, `x-` ones included (`x-match: all-with-x`).
    AllWithX,
    /// At least one, `x-` ones included (`x-match: any-with-x`).
    AnyWithX,
}

impl XMatch {
    /// RabbitMQ's name for the mode, as the `x-match` argument says it.
    pub fn as_str(self) -> &'static str {
        match self {
            XMatch::All => "all",
            XMatch::Any => "any",
            XMatch::AllWithX => "all-with-x",
            XMatch::AnyWithX => "any-with-x",
        }
    }

    fn with_x(self) -> bool {
        matches!(self, XMatch::AllWithX | XMatch::AnyWithX)
    }
}

/// A binding its exchange cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// A headers binding's `x-match` was not one of `all`, `any`,
    /// `all-with-x`, `any-with-x`.
    #[error("x-match must be \"all\", \"any\", \"all-with-x\" or \"any-with-x\", not {0:?}")]
    BadXMatch(String),
    /// A consistent-hash binding's key was not a weight (an integer of at
    /// least 1), as RabbitMQ's plugin refuses it.
    #[error("a consistent-hash binding key must be an integer of at least 1, not {0:?}")]
    BadWeight(String),
}

/// The arguments of one headers-exchange binding.
///
/// A binding lists header values and an `x-match` mode: `all` (the default)
/// needs every listed header present with an equal value; `any` needs at least
/// one. Binding arguments whose names start with `x-` are not matched.
///
/// ```
/// use postbox_actors::HeadersMatch;
/// use postbox_actors::{Envelope, Headers};
///
/// let reports = HeadersMatch::all([("format", "pdf"), ("type", "report")]);
/// let msg = Envelope::new("..").with_header("format", "pdf").with_header("type", "report");
/// assert!(reports.matches(msg.headers()));
/// assert!(!reports.matches(Envelope::new("..").with_header("format", "pdf").headers()));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct HeadersMatch {
    mode: XMatch,
    /// Sorted by name; no `x-` names.
    headers: Vec<(ByteString, HeaderValue)>,
}

impl HeadersMatch {
    /// Matches messages that carry every one of `headers`.
    pub fn all<K: Into<ByteString>, V: Into<HeaderValue>>(
        headers: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self::new(XMatch::All, headers)
    }

    /// Matches messages that carry at least one of `headers`.
    pub fn any<K: Into<ByteString>, V: Into<HeaderValue>>(
        headers: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self::new(XMatch::Any, headers)
    }

    /// A binding with an explicit mode. A value of [`HeaderValue::Void`]
    /// matches a header of that name whatever its value (AMQP's void).
    pub fn new<K: Into<ByteString>, V: Into<HeaderValue>>(
        mode: XMatch,
        headers: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut headers: Vec<(ByteString, HeaderValue)> = headers
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| &**k != "x-match" && (mode.with_x() || !k.starts_with("x-")))
            .collect();
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        headers.dedup_by(|a, b| a.0 == b.0);
        HeadersMatch { mode, headers }
    }

    /// Parses RabbitMQ-style binding arguments: an optional `x-match` header
    /// (`"all"`, `"any"`, `"all-with-x"` or `"any-with-x"`) plus the headers
    /// to match.
    pub fn from_arguments(arguments: &Headers) -> Result<Self, BindingError> {
        let mode = match arguments.get("x-match") {
            None => XMatch::All,
            Some(HeaderValue::Str(s)) => match &**s {
                "all" => XMatch::All,
                "any" => XMatch::Any,
                "all-with-x" => XMatch::AllWithX,
                "any-with-x" => XMatch::AnyWithX,
                other => return Err(BindingError::BadXMatch(other.to_string())),
            },
            Some(other) => return Err(BindingError::BadXMatch(format!("{other:?}"))),
        };
        Ok(Self::new(
            mode,
            arguments.iter().map(|(k, v)| (k.clone(), v.clone())),
        ))
    }

    /// The `x-match` mode.
    pub fn mode(&self) -> XMatch {
        self.mode
    }

    /// The binding's arguments, as RabbitMQ would list them: `x-match` and
    /// the headers to match.
    pub fn to_arguments(&self) -> Headers {
        let mut arguments: Headers = self.headers.iter().cloned().collect();
        arguments.insert("x-match".into(), HeaderValue::from(self.mode.as_str()));
        arguments
    }

    /// Does a message with these headers match? An `all` binding with no
    /// headers matches everything; an `any` binding with none matches nothing.
    pub fn matches(&self, message: &Headers) -> bool {
        let hit = |(k, v): &(ByteString, HeaderValue)| match (v, message.get(k)) {
            (HeaderValue::Void, found) => found.is_some(),
            (v, found) => found == Some(v),
        };
        match self.mode {
            XMatch::All | XMatch::AllWithX => self.headers.iter().all(hit),
            XMatch::Any | XMatch::AnyWithX => self.headers.iter().any(hit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;

    fn headers(pairs: &[(&str, HeaderValue)]) -> Headers {
        let mut e = Envelope::new("");
        for (k, v) in pairs {
            e = e.with_header(k.to_string(), v.clone());
        }
        e.headers().clone()
    }

    #[test]
    fn all_and_any() {
        let all = HeadersMatch::all([
            ("a", HeaderValue::from(1i64)),
            ("b", HeaderValue::from("x")),
        ]);
        let any = HeadersMatch::any([
            ("a", HeaderValue::from(1i64)),
            ("b", HeaderValue::from("x")),
        ]);
        let both = headers(&[("a", 1i64.into()), ("b", "x".into()), ("c", true.into())]);
        let one = headers(&[("a", 1i64.into())]);
        let wrong = headers(&[("a", 2i64.into()), ("b", "y".into())]);
        assert!(all.matches(&both) && any.matches(&both));
        assert!(!all.matches(&one) && any.matches(&one));
        assert!(!all.matches(&wrong) && !any.matches(&wrong));
        // Types matter: 1 is not "1".
        assert!(!any.matches(&headers(&[("a", "1".into())])));
    }

    #[test]
    fn x_arguments_are_not_matched_and_x_match_is_parsed() {
        let mut args = headers(&[
            ("x-match", "any".into()),
            ("x-other", "z".into()),
            ("k", "v".into()),
        ]);
        let m = HeadersMatch::from_arguments(&args).unwrap();
        assert_eq!(m.mode(), XMatch::Any);
        assert!(m.matches(&headers(&[("k", "v".into())])));
        args.insert("x-match".into(), "most".into());
        assert!(matches!(
            HeadersMatch::from_arguments(&args),
            Err(BindingError::BadXMatch(_))
        ));
    }

    /// As RabbitMQ 3.10 routes them (checked against the broker).
    #[test]
    fn with_x_modes_and_void_values() {
        let args = |pairs: &[(&str, HeaderValue)]| headers(pairs);
        let all = HeadersMatch::from_arguments(&args(&[
            ("x-match", "all".into()),
            ("a", "1".into()),
            ("x-k", "v".into()),
        ]))
        .unwrap();
        let all_x = HeadersMatch::from_arguments(&args(&[
            ("x-match", "all-with-x".into()),
            ("a", "1".into()),
            ("x-k", "v".into()),
        ]))
        .unwrap();
        let any_x = HeadersMatch::from_arguments(&args(&[
            ("x-match", "any-with-x".into()),
            ("x-k", "v".into()),
            ("b", "2".into()),
        ]))
        .unwrap();
        let void = HeadersMatch::all([("a", HeaderValue::Void)]);
        let m1 = headers(&[("a", "1".into())]);
        let m2 = headers(&[("a", "1".into()), ("x-k", "v".into())]);
        let m3 = headers(&[("x-k", "v".into())]);
        let m4 = headers(&[("a", "zzz".into())]);
        let routes = |m: &HeadersMatch| {
            [&m1, &m2, &m3, &m4]
                .iter()
                .enumerate()
                .filter(|(_, h)| m.matches(h))
                .map(|(i, _)| i + 1)
                .collect::<Vec<_>>()
        };
        assert_eq!(routes(&all), [1, 2]);
        assert_eq!(routes(&all_x), [2]);
        assert_eq!(routes(&any_x), [2, 3]);
        assert_eq!(routes(&void), [1, 2, 4]);
        assert_eq!(
            any_x.to_arguments().get("x-match"),
            Some(&HeaderValue::from("any-with-x"))
        );
    }

    #[test]
    fn empty_bindings() {
        let empty = Headers::new();
        assert!(HeadersMatch::all(Vec::<(&str, &str)>::new()).matches(&empty));
        assert!(!HeadersMatch::any(Vec::<(&str, &str)>::new()).matches(&empty));
    }
}
