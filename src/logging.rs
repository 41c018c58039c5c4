//! Log output: plain text for a terminal, or one JSON object / logfmt line per record for a
//! log pipeline. Call sites log structured key-values (`action = …, outcome = …`); this file
//! alone decides how they are written. Nothing logged anywhere carries a secret or a payload.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
    Logfmt,
}

impl LogFormat {
    pub fn parse(text: &str) -> Option<LogFormat> {
        match text {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            "logfmt" => Some(LogFormat::Logfmt),
            _ => None,
        }
    }
}

/// Installs the process logger. `RUST_LOG`, when set, overrides `level` (it also accepts
/// per-module directives such as `actiongate=debug,pingora_core=warn`).
/// A duration in milliseconds rounded to the microsecond, the one unit every log line uses:
/// `8.544`, not `8.543560000000001` (f64 noise) or a `Debug` mix of `ms` and `µs`.
pub fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

pub fn init(format: LogFormat, level: &str) {
    let filters = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&filters);
    builder.format(move |buf, record| {
        let mut fields = Fields(Vec::new());
        // Visiting our own key-values cannot fail.
        let _ = record.key_values().visit(&mut fields);
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let level = record.level().as_str().to_ascii_lowercase();
        match format {
            LogFormat::Json => {
                let mut line = serde_json::Map::new();
                line.insert("ts".into(), ts.to_string().into());
                line.insert("level".into(), level.into());
                line.insert("target".into(), record.target().into());
                line.insert("msg".into(), record.args().to_string().into());
                for (key, value) in fields.0 {
                    line.insert(key, value);
                }
                writeln!(buf, "{}", serde_json::Value::Object(line))
            }
            LogFormat::Logfmt => {
                write!(
                    buf,
                    "ts={ts} level={level} target={}",
                    logfmt_value(record.target())
                )?;
                write!(buf, " msg={}", logfmt_value(&record.args().to_string()))?;
                for (key, value) in fields.0 {
                    write!(buf, " {key}={}", logfmt_value(&plain(&value)))?;
                }
                writeln!(buf)
            }
            LogFormat::Text => {
                write!(
                    buf,
                    "[{ts} {:5} {}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                )?;
                for (key, value) in fields.0 {
                    write!(buf, " {key}={}", logfmt_value(&plain(&value)))?;
                }
                writeln!(buf)
            }
        }
    });
    // A second init (e.g. in tests) keeps the first logger.
    let _ = builder.try_init();
}

struct Fields(Vec<(String, serde_json::Value)>);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let json = if is_null(&value) {
            // An `Option` logged as `None` (no HTTP status on a connection failure): null, as
            // the dead-letter API says it, not a made-up 0.
            serde_json::Value::Null
        } else if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(f) = value.to_f64() {
            f.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else {
            value.to_string().into()
        };
        self.0.push((key.as_str().to_string(), json));
        Ok(())
    }
}

fn is_null(value: &Value<'_>) -> bool {
    struct Null(bool);
    impl log::kv::VisitValue<'_> for Null {
        fn visit_any(&mut self, _: Value) -> Result<(), log::kv::Error> {
            Ok(())
        }
        fn visit_null(&mut self) -> Result<(), log::kv::Error> {
            self.0 = true;
            Ok(())
        }
    }
    let mut null = Null(false);
    let _ = value.visit(&mut null);
    null.0
}

fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A logfmt value: bare when it is a simple token, quoted and escaped otherwise.
fn logfmt_value(text: &str) -> String {
    let bare = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        text.to_string()
    } else {
        serde_json::Value::String(text.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_values_are_quoted_only_when_needed() {
        assert_eq!(logfmt_value("accepted"), "accepted");
        assert_eq!(logfmt_value("127.0.0.1"), "127.0.0.1");
        assert_eq!(
            logfmt_value("timed out after 10s"),
            "\"timed out after 10s\""
        );
        assert_eq!(logfmt_value("a=b"), "\"a=b\"");
        assert_eq!(logfmt_value("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(logfmt_value(""), "\"\"");
    }

    #[test]
    fn no_status_is_null_and_durations_carry_no_float_noise() {
        use log::kv::ToValue;
        let mut fields = Fields(Vec::new());
        let none: Option<u16> = None;
        fields
            .visit_pair(Key::from("status"), none.to_value())
            .unwrap();
        fields
            .visit_pair(Key::from("code"), Some(503u16).to_value())
            .unwrap();
        let took = millis(std::time::Duration::from_nanos(8_543_560_001));
        fields.visit_pair(Key::from("ms"), took.to_value()).unwrap();
        assert_eq!(
            serde_json::Value::Object(fields.0.into_iter().collect()).to_string(),
            r#"{"status":null,"code":503,"ms":8543.56}"#
        );
        assert_eq!(
            millis(std::time::Duration::from_nanos(1_797_650_999)),
            1797.65
        );
    }
}
