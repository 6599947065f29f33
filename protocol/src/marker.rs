//! The markers that split the device logs: `BEGIN <span>` and `END <span>`, sent
//! by the guest as `mark` control lines and logged by the VMM between the DMA
//! records. A span is usually a [`Method`]; other steps name their own (`send` for
//! the `send:` step, `read` in the device tests), so a span is a name, and a method
//! converts to one.
//!
//! When one boot runs the methods on several cards, one per NIC variant
//! (`zc.cards`, [`crate::options::SuiteCard`]), each span also names its variant:
//! `<method>@<variant>`, e.g. `BEGIN sendfile@sg-off` ([`qualified_span`]), so a
//! method run on two cards has two spans.

use std::fmt;

use crate::method::Method;

/// The span of the guest's `send:<file>` step (`zc.test=send:...`).
pub const SEND_SPAN: SpanName<'static> = SpanName::new("send");

/// What separates a span's name from its NIC variant: `sendfile@sg-off`.
pub const VARIANT_SEP: char = '@';

/// The span of `name` run on the card of NIC variant `variant` (`sendfile@sg-off`),
/// or plain `name` when the run has one unnamed card.
pub fn qualified_span(name: &str, variant: Option<&str>) -> String {
    match variant {
        Some(variant) => format!("{name}{VARIANT_SEP}{variant}"),
        None => name.to_string(),
    }
}

/// Whether `name` can be a variant's name in spans and options: 1 to 32 ASCII
/// letters, digits, `-` or `_` (no separator of a span, a mark or `zc.cards`).
pub fn valid_variant(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const BEGIN: &str = "BEGIN ";
const END: &str = "END ";

/// The name of a span between two markers: a method's name or another step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanName<'a>(&'a str);

impl<'a> SpanName<'a> {
    /// A span called `name`.
    pub const fn new(name: &'a str) -> SpanName<'a> {
        SpanName(name)
    }

    /// The name.
    pub const fn as_str(&self) -> &'a str {
        self.0
    }

    /// The method of that name, if the span is a method's (on whichever card).
    pub fn method(&self) -> Option<Method> {
        Method::from_name(self.split_variant().0)
    }

    /// The name without its variant, and the variant if the span names one
    /// (`sendfile@sg-off` -> `sendfile`, `sg-off`).
    pub fn split_variant(&self) -> (&'a str, Option<&'a str>) {
        match self.0.split_once(VARIANT_SEP) {
            Some((name, variant)) => (name, Some(variant)),
            None => (self.0, None),
        }
    }
}

impl From<Method> for SpanName<'static> {
    fn from(method: Method) -> SpanName<'static> {
        SpanName(method.name())
    }
}

impl<'a> From<&'a str> for SpanName<'a> {
    fn from(name: &'a str) -> SpanName<'a> {
        SpanName(name)
    }
}

impl fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// One marker; its text ([`Marker::label`], `Display`) is the `mark` line's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Marker<'a> {
    /// The span starts: `BEGIN <name>`.
    Begin(SpanName<'a>),
    /// The span ends: `END <name>`.
    End(SpanName<'a>),
}

impl<'a> Marker<'a> {
    /// `BEGIN <span>`.
    pub fn begin(span: impl Into<SpanName<'a>>) -> Marker<'a> {
        Marker::Begin(span.into())
    }

    /// `END <span>`.
    pub fn end(span: impl Into<SpanName<'a>>) -> Marker<'a> {
        Marker::End(span.into())
    }

    /// The marker a label is, if it is one (`None` for any other label).
    pub fn parse(label: &'a str) -> Option<Marker<'a>> {
        if let Some(name) = label.strip_prefix(BEGIN) {
            Some(Marker::Begin(SpanName(name)))
        } else {
            label
                .strip_prefix(END)
                .map(|name| Marker::End(SpanName(name)))
        }
    }

    /// The span it begins or ends.
    pub fn span(&self) -> SpanName<'a> {
        match self {
            Marker::Begin(span) | Marker::End(span) => *span,
        }
    }

    /// Whether `label` is this marker's text (without building it).
    pub fn matches(&self, label: &str) -> bool {
        Marker::parse(label).as_ref() == Some(self)
    }

    /// The label, as the `mark` line carries it.
    pub fn label(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Marker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Marker::Begin(span) => write!(f, "{BEGIN}{span}"),
            Marker::End(span) => write!(f, "{END}{span}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(Marker::begin(Method::Sendfile).label(), "BEGIN sendfile");
        assert_eq!(Marker::end("send").label(), "END send");
        for marker in [
            Marker::begin(Method::UringSendZc),
            Marker::end(Method::ReadWrite),
            Marker::begin("read"),
            Marker::end("a b"),
        ] {
            let label = marker.label();
            assert_eq!(Marker::parse(&label), Some(marker));
            assert!(marker.matches(&label));
        }
        assert_eq!(
            Marker::parse("BEGIN sendfile").map(|m| m.span().method()),
            Some(Some(Method::Sendfile))
        );
    }

    #[test]
    fn a_span_on_a_named_card_says_its_variant() {
        let span = qualified_span(Method::Sendfile.name(), Some("sg-off"));
        assert_eq!(span, "sendfile@sg-off");
        let begin = Marker::begin(span.as_str());
        assert_eq!(begin.label(), "BEGIN sendfile@sg-off");
        let label = begin.label();
        let parsed = Marker::parse(&label).unwrap();
        assert_eq!(parsed, begin);
        assert_eq!(parsed.span().split_variant(), ("sendfile", Some("sg-off")));
        assert_eq!(parsed.span().method(), Some(Method::Sendfile));
        // Spans of the same method on two cards are two spans.
        assert!(!Marker::begin("sendfile@sg-on").matches(&label));
        assert!(!Marker::begin(Method::Sendfile).matches(&label));
        // A plain span has no variant.
        assert_eq!(qualified_span("sendfile", None), "sendfile");
        assert_eq!(SpanName::new("send").split_variant(), ("send", None));
    }

    #[test]
    fn variant_names_keep_spans_and_options_parseable() {
        for good in ["sg-on", "sg-off", "a", "card_1", &"x".repeat(32)] {
            assert!(valid_variant(good), "{good}");
        }
        for bad in ["", "sg on", "sg@on", "a:b", "a,b", "a/b", &"x".repeat(33)] {
            assert!(!valid_variant(bad), "{bad}");
        }
    }

    #[test]
    fn other_labels_are_not_markers() {
        for label in ["", "BEGIN", "begin x", "ENDx", "x BEGIN y", " END x"] {
            assert_eq!(Marker::parse(label), None, "{label:?}");
        }
        assert!(!Marker::begin("x").matches("END x"));
        assert!(!Marker::begin("x").matches("BEGIN xy"));
    }
}
