//! The guest → VMM control channel: one text message per `\n`-terminated line on
//! the control UART ([`crate::addr::CONTROL_UART_BASE`], COM2).
//!
//! Messages: `hello <kernel release>`, `uptime <seconds>`, `log <text>`,
//! `mark <label>`, `report <json>`, `exit <code>`. [`ControlMessage::to_line`] is
//! the one writer (the guest's), [`ControlMessage::parse`] the one reader (the
//! VMM's); `docs/control-channel.md` documents the format.

use std::fmt::Write as _;

/// Longest line the VMM accepts; a longer one is cut and reported as malformed,
/// so a runaway guest cannot make the VMM buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// One message from the guest. As JSON (the `serde` feature, e.g. in a run
/// summary): `{"kind":"hello","kernel_release":"6.1.0"}`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum ControlMessage {
    /// `hello <kernel release>`: the guest program started; names the running kernel.
    Hello {
        /// `uname -r` of the guest kernel.
        kernel_release: String,
    },
    /// `uptime <seconds>`: the guest's `/proc/uptime` when its program started,
    /// sent with two decimals.
    Uptime {
        /// Seconds since the guest kernel started.
        seconds: f64,
    },
    /// `mark <label>`: a point in time the device logs are split at (a
    /// [`crate::Marker`]'s label, for the markers the audit reads).
    Mark {
        /// Free-form label, e.g. `BEGIN sendfile`.
        label: String,
    },
    /// `log <text>`: a human-readable line from the guest program.
    Log {
        /// The text.
        text: String,
    },
    /// `report <json>`: a machine-readable result; the payload is kept verbatim.
    Report {
        /// The JSON text, unparsed.
        json: String,
    },
    /// `exit <code>`: the guest program finished with this status; the VMM exits with it.
    Exit {
        /// Exit status, 0 for success.
        code: i32,
    },
    /// A line that does not follow the protocol; kept so the VMM can show it.
    Malformed {
        /// The offending line, lossily decoded.
        line: String,
    },
}

impl ControlMessage {
    /// Parses one line (without its trailing newline).
    pub fn parse(line: &str) -> ControlMessage {
        let line = line.trim_end_matches('\r');
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let malformed = || ControlMessage::Malformed {
            line: line.to_string(),
        };
        match verb {
            "hello" if !rest.is_empty() => ControlMessage::Hello {
                kernel_release: rest.to_string(),
            },
            "uptime" => rest
                .trim()
                .parse()
                .map(|seconds| ControlMessage::Uptime { seconds })
                .unwrap_or_else(|_| malformed()),
            "mark" if !rest.is_empty() => ControlMessage::Mark {
                label: rest.to_string(),
            },
            "log" => ControlMessage::Log {
                text: rest.to_string(),
            },
            "report" if !rest.is_empty() => ControlMessage::Report {
                json: rest.to_string(),
            },
            "exit" => rest
                .trim()
                .parse()
                .map(|code| ControlMessage::Exit { code })
                .unwrap_or_else(|_| malformed()),
            _ => malformed(),
        }
    }

    /// Formats the message as exactly one line: `<verb> <text>\n`, or `<verb>\n`
    /// when the text is empty (a `Malformed` message is its line as is).
    ///
    /// Control characters in the text (`\n`, `\r`, and the rest of C0 and DEL) are
    /// replaced by a space, so a message can never be split into two lines or carry
    /// terminal escapes. That is lossless for the JSON of `report` (JSON strings
    /// cannot contain raw control characters, and between tokens they are just
    /// whitespace).
    pub fn to_line(&self) -> Vec<u8> {
        let mut number = String::new();
        let (verb, text) = match self {
            ControlMessage::Hello { kernel_release } => ("hello", kernel_release.as_str()),
            ControlMessage::Uptime { seconds } => {
                let _ = write!(number, "{seconds:.2}");
                ("uptime", number.as_str())
            }
            ControlMessage::Mark { label } => ("mark", label.as_str()),
            ControlMessage::Log { text } => ("log", text.as_str()),
            ControlMessage::Report { json } => ("report", json.as_str()),
            ControlMessage::Exit { code } => {
                let _ = write!(number, "{code}");
                ("exit", number.as_str())
            }
            ControlMessage::Malformed { line } => ("", line.as_str()),
        };
        let mut line = Vec::with_capacity(verb.len() + text.len() + 2);
        line.extend_from_slice(verb.as_bytes());
        if !text.is_empty() {
            if !verb.is_empty() {
                line.push(b' ');
            }
            line.extend(text.bytes().map(|b| if is_control(b) { b' ' } else { b }));
        }
        line.push(b'\n');
        line
    }
}

/// The bytes [`ControlMessage::to_line`] replaces: C0 controls and DEL.
fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(message: ControlMessage) -> String {
        String::from_utf8(message.to_line()).unwrap()
    }

    #[test]
    fn formats_each_message() {
        let text = |s: &str| s.to_string();
        assert_eq!(
            line(ControlMessage::Hello {
                kernel_release: text("6.1.0-56-cloud-amd64")
            }),
            "hello 6.1.0-56-cloud-amd64\n"
        );
        assert_eq!(
            line(ControlMessage::Uptime { seconds: 1.234 }),
            "uptime 1.23\n"
        );
        assert_eq!(
            line(ControlMessage::Log {
                text: text("3 modules")
            }),
            "log 3 modules\n"
        );
        assert_eq!(
            line(ControlMessage::Mark {
                label: crate::Marker::begin(crate::Method::Sendfile).label()
            }),
            "mark BEGIN sendfile\n"
        );
        assert_eq!(
            line(ControlMessage::Report {
                json: text(r#"{"a":1}"#)
            }),
            "report {\"a\":1}\n"
        );
        assert_eq!(line(ControlMessage::Exit { code: 0 }), "exit 0\n");
        assert_eq!(line(ControlMessage::Exit { code: -1 }), "exit -1\n");
        assert_eq!(line(ControlMessage::Log { text: text("") }), "log\n");
    }

    #[test]
    fn control_characters_cannot_split_a_message() {
        let out = line(ControlMessage::Log {
            text: "line one\nline two\r\n\x1b[31mred\x7f".into(),
        });
        assert_eq!(out, "log line one line two   [31mred \n");
        assert_eq!(out.matches('\n').count(), 1);
        // Non-ASCII text passes through untouched.
        assert_eq!(
            line(ControlMessage::Log {
                text: "héllo".into()
            }),
            "log héllo\n"
        );
    }

    #[test]
    fn parses_lines() {
        let cases = [
            (
                "hello 6.1.0-56-cloud-amd64",
                ControlMessage::Hello {
                    kernel_release: "6.1.0-56-cloud-amd64".into(),
                },
            ),
            ("uptime 1.25", ControlMessage::Uptime { seconds: 1.25 }),
            (
                "mark BEGIN sendfile",
                ControlMessage::Mark {
                    label: "BEGIN sendfile".into(),
                },
            ),
            (
                "log hi there",
                ControlMessage::Log {
                    text: "hi there".into(),
                },
            ),
            (
                "report {\"a\":1}",
                ControlMessage::Report {
                    json: "{\"a\":1}".into(),
                },
            ),
            ("exit 3", ControlMessage::Exit { code: 3 }),
            ("exit -1\r", ControlMessage::Exit { code: -1 }),
        ];
        for (text, expected) in cases {
            assert_eq!(ControlMessage::parse(text), expected, "{text:?}");
        }
        for bad in ["exit x", "uptime", "hello", "mark", "report", "bogus 1", ""] {
            assert_eq!(
                ControlMessage::parse(bad),
                ControlMessage::Malformed { line: bad.into() },
                "{bad:?}"
            );
        }
    }

    /// xorshift64: a deterministic generator for the round-trip property below.
    /// Hand-written instead of `proptest`, which is not in the offline registry
    /// cache and would pull `rand` and its dependencies into every build of the
    /// workspace; a fixed seed also makes any failure reproduce exactly.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// An index into a slice of `len` items.
        fn index(&mut self, len: usize) -> usize {
            usize::try_from(self.below(len as u64)).expect("below len")
        }

        /// The low 32 bits of the next value, as an `i32`.
        fn low_i32(&mut self) -> i32 {
            let [a, b, c, d, ..] = self.next().to_le_bytes();
            i32::from_le_bytes([a, b, c, d])
        }

        /// Text of up to 40 characters, biased towards what can break a line
        /// format: spaces, control characters, `\r`, DEL and non-ASCII.
        fn text(&mut self) -> String {
            const SPECIAL: &[char] = &[' ', '\n', '\r', '\t', '\0', '\x1b', '\x7f', 'é', '€', '{'];
            (0..self.below(41))
                .map(|_| match self.below(4) {
                    0 => SPECIAL[self.index(SPECIAL.len())],
                    _ => char::from(b' ' + u8::try_from(self.below(95)).expect("below 95")),
                })
                .collect()
        }

        fn message(&mut self) -> ControlMessage {
            match self.below(6) {
                0 => ControlMessage::Hello {
                    kernel_release: self.text(),
                },
                // Hundredths: what the two decimals on the wire carry exactly.
                1 => ControlMessage::Uptime {
                    seconds: self.below(10_000_000) as f64 / 100.0,
                },
                2 => ControlMessage::Mark { label: self.text() },
                3 => ControlMessage::Log { text: self.text() },
                4 => ControlMessage::Report { json: self.text() },
                _ => ControlMessage::Exit {
                    code: self.low_i32(),
                },
            }
        }
    }

    /// The message a receiver can get back: control characters become spaces
    /// (see `to_line`); a `hello`, `mark` or `report` without text is malformed.
    fn expected_after_round_trip(message: &ControlMessage) -> ControlMessage {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_ascii_control() { ' ' } else { c })
                .collect()
        };
        match message {
            ControlMessage::Hello { kernel_release } if kernel_release.is_empty() => {
                ControlMessage::Malformed {
                    line: "hello".into(),
                }
            }
            ControlMessage::Mark { label } if label.is_empty() => ControlMessage::Malformed {
                line: "mark".into(),
            },
            ControlMessage::Report { json } if json.is_empty() => ControlMessage::Malformed {
                line: "report".into(),
            },
            ControlMessage::Hello { kernel_release } => ControlMessage::Hello {
                kernel_release: clean(kernel_release),
            },
            ControlMessage::Mark { label } => ControlMessage::Mark {
                label: clean(label),
            },
            ControlMessage::Log { text } => ControlMessage::Log { text: clean(text) },
            ControlMessage::Report { json } => ControlMessage::Report { json: clean(json) },
            other => other.clone(),
        }
    }

    #[test]
    fn format_then_parse_gives_the_message_back() {
        let mut gen = Gen(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let message = gen.message();
            let bytes = message.to_line();
            assert_eq!(bytes.last(), Some(&b'\n'));
            assert_eq!(
                bytes.iter().filter(|&&b| b == b'\n').count(),
                1,
                "{message:?}"
            );
            let line = std::str::from_utf8(&bytes[..bytes.len() - 1]).unwrap();
            assert_eq!(
                ControlMessage::parse(line),
                expected_after_round_trip(&message),
                "{message:?} as {line:?}"
            );
        }
    }

    #[test]
    fn parse_then_format_gives_a_clean_line_back() {
        let mut gen = Gen(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            const VERBS: &[&str] = &["hello", "mark", "log", "report", "bogus", ""];
            let verb = VERBS[gen.index(VERBS.len())];
            let text = gen.text().replace(|c: char| c.is_ascii_control(), " ");
            let line = format!("{verb} {text}");
            let message = ControlMessage::parse(&line);
            if line == "log " {
                continue; // `log ` and `log` are the same empty log line
            }
            assert_eq!(
                message.to_line(),
                format!("{line}\n").into_bytes(),
                "{line:?}"
            );
        }
    }
}
