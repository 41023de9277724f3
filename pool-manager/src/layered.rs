//! Flags from the command line, the environment and a TOML file, over each flag's
//! default: the command line wins over the environment, which wins over the file.
//!
//! Shared by `nullspace-pool-manager` and `nullspace-api` (`api-host` includes this
//! file), so both daemons read their settings the same way:
//!
//! - every long flag `--some-flag` of the chosen (sub)command is also read from the
//!   environment variable `NULLSPACE_SOME_FLAG` ([`env_name`]): a repeatable flag takes
//!   comma-separated values, a switch `true`/`false` (`1`/`0`, `yes`/`no`, `on`/`off`;
//!   empty is off, as unset), and an empty value counts as unset for the others;
//! - `--config FILE` (`NULLSPACE_CONFIG`) names a TOML file whose keys are the flags'
//!   names (`state-dir = "/var/lib/nullspace"`): a string or a number per flag, an
//!   array for a repeatable one, a boolean for a switch. A key no (sub)command knows is
//!   an error naming the valid ones; a key only other subcommands take is allowed (one
//!   file serves `serve` and the `admin` commands alike).
//!
//! The parse takes the environment as a function, so tests never touch the process's.

use clap::builder::{Arg, ArgAction, Command};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The flag naming the file (`--config`, `NULLSPACE_CONFIG`).
pub const CONFIG: &str = "config";

/// The environment variable of the flag `--long`: `NULLSPACE_` and the name in upper
/// snake case (`--state-dir` → `NULLSPACE_STATE_DIR`).
pub fn env_name(long: &str) -> String {
    format!("NULLSPACE_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// How a flag takes values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No value (`--operator`): true or false.
    Switch,
    /// Repeatable (`--set A --set B`).
    Repeat,
    /// One value; the last one given wins.
    Single,
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        match arg.get_action() {
            ArgAction::SetTrue => Kind::Switch,
            ArgAction::Append => Kind::Repeat,
            _ => Kind::Single,
        }
    }

    /// What a file should say for a flag of this kind.
    fn what_to_send(self, key: &str) -> String {
        match self {
            Kind::Switch => format!("send true or false, e.g. {key} = true"),
            Kind::Repeat => format!("send an array of strings, e.g. {key} = [\"...\"]"),
            Kind::Single => format!("send a string or a number, e.g. {key} = \"...\""),
        }
    }
}

/// The flags this module fills in: every long, non-positional one but `--help`,
/// `--version` and `--config`.
fn layered_args(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| {
        !a.is_positional()
            && a.get_long()
                .is_some_and(|l| !matches!(l, "help" | "version" | CONFIG))
    })
}

/// The command `T` describes, with each flag's environment variable in its help and
/// repeated single-value flags allowed (the last one wins, as before clap).
pub fn command<T: clap::CommandFactory>() -> Command {
    fn decorate(cmd: Command) -> Command {
        cmd.mut_args(|a| {
            let Some(long) = a.get_long().filter(|l| !matches!(*l, "help" | "version")) else {
                return a;
            };
            let env = format!("[env: {}]", env_name(long));
            let help = a.get_help().map(|h| format!("{h} {env}"));
            let long_help = a.get_long_help().map(|h| format!("{h} {env}"));
            let a = a.help(help.unwrap_or(env));
            match long_help {
                Some(h) => a.long_help(h),
                None => a,
            }
        })
        .mut_subcommands(decorate)
    }
    decorate(T::command().args_override_self(true))
}

/// Parses `argv` (the program's name first) with the environment `env` and the file
/// `--config` names layered under it. Errors, `--help` included, are clap's: `exit()`
/// prints them and ends the process (0 for help, 2 for a mistake).
pub fn parse<T: clap::CommandFactory + clap::FromArgMatches>(
    argv: impl IntoIterator<Item = impl Into<OsString>>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<T, clap::Error> {
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut cmd = command::<T>();
    let given = cmd.clone().try_get_matches_from(&argv)?;
    // The chosen subcommand: its flags are the ones filled in.
    let (mut leaf, mut matches) = (&cmd, &given);
    while let Some((name, sub)) = matches.subcommand() {
        leaf = leaf
            .find_subcommand(name)
            .expect("clap parsed a subcommand the command has");
        matches = sub;
    }
    let config_path = match given
        .try_get_raw(CONFIG)
        .ok()
        .flatten()
        .and_then(|mut v| v.next())
    {
        Some(path) => Some(PathBuf::from(path)),
        None => env(&env_name(CONFIG))
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
    };
    let file = match &config_path {
        Some(path) => Some(ConfigFile::load(path, &cmd)?),
        None => None,
    };
    let mut extra: Vec<OsString> = Vec::new();
    for arg in layered_args(leaf) {
        if matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let long = arg.get_long().expect("layered flags are long");
        let kind = Kind::of(arg);
        let var = env_name(long);
        let (origin, values) = match env(&var).filter(|v| kind == Kind::Switch || !v.is_empty()) {
            Some(value) => {
                let Some(value) = value.to_str() else {
                    return Err(fail(format!("{var} (--{long}) is not UTF-8")));
                };
                let origin = format!("{var}={value} (--{long})");
                let values = match kind {
                    Kind::Switch => match switch_value(value) {
                        Some(on) => vec![Value::Switch(on)],
                        None => {
                            return Err(fail(format!(
                                "{origin}: send true or false (1 or 0, yes or no, on or off)"
                            )))
                        }
                    },
                    Kind::Repeat => value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(|v| Value::Text(v.to_string()))
                        .collect(),
                    Kind::Single => vec![Value::Text(value.to_string())],
                };
                (origin, values)
            }
            None => match file.as_ref().and_then(|f| Some((f, f.values.get(long)?))) {
                Some((f, values)) => (format!("{}: {long}", f.path.display()), values.clone()),
                None => continue,
            },
        };
        for value in values {
            match value {
                Value::Switch(true) => extra.push(format!("--{long}").into()),
                Value::Switch(false) => {}
                Value::Text(text) => {
                    check_value(arg, &text).map_err(|why| fail(format!("{origin}: {why}")))?;
                    extra.push(format!("--{long}={text}").into());
                }
            }
        }
    }
    // After what was given, before a `--` that ends the flags.
    let mut argv = argv;
    let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    argv.splice(at..at, extra);
    let matches = cmd.try_get_matches_from_mut(&argv)?;
    T::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// A value from the environment or the file.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Switch(bool),
    Text(String),
}

/// A switch's value in the environment. Empty is off, as unset is: a variable cleared
/// the usual ways (`Environment=VAR=` in a unit, `value: ""` in a manifest) must never
/// turn a switch on, least of all an `insecure-` one.
fn switch_value(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "" | "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// An error clap prints as `error: ...` and exits 2 on.
fn fail(message: String) -> clap::Error {
    clap::Error::raw(ErrorKind::ValueValidation, format!("{message}\n"))
}

/// Whether `value` is one `arg` takes: its own value parser decides, on a command of
/// that flag alone; the error says what to send.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let long = arg.get_long().expect("layered flags are long");
    let one = Command::new("check")
        .no_binary_name(true)
        // Alone: what it requires or conflicts with is checked on the whole command.
        .arg(
            arg.clone()
                .required(false)
                .global(false)
                .requires(clap::builder::Resettable::<clap::Id>::Reset)
                .conflicts_with(clap::builder::Resettable::<clap::Id>::Reset),
        );
    match one.try_get_matches_from([format!("--{long}={value}")]) {
        Ok(_) => Ok(()),
        Err(e) => Err(match std::error::Error::source(&e) {
            Some(why) => format!("{value:?}: {why}"),
            None => {
                let text = e.to_string();
                let text = text.trim_start_matches("error: ");
                text.split("\n\nFor more")
                    .next()
                    .unwrap_or(text)
                    .trim()
                    .to_string()
            }
        }),
    }
}

/// The values of a config file, by flag name.
struct ConfigFile {
    path: PathBuf,
    values: BTreeMap<String, Vec<Value>>,
}

impl ConfigFile {
    /// Reads and checks `path` against every flag `cmd` and its subcommands take.
    fn load(path: &Path, cmd: &Command) -> Result<ConfigFile, clap::Error> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(format!(
                "reading the config file {shown} (--config, NULLSPACE_CONFIG): {e}"
            ))
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| fail(format!("config file {shown}: {e}")))?;
        let mut kinds = BTreeMap::new();
        fn collect(cmd: &Command, kinds: &mut BTreeMap<String, Kind>) {
            for arg in layered_args(cmd) {
                kinds.insert(
                    arg.get_long().unwrap_or_default().to_string(),
                    Kind::of(arg),
                );
            }
            for sub in cmd.get_subcommands() {
                collect(sub, kinds);
            }
        }
        collect(cmd, &mut kinds);
        let mut values = BTreeMap::new();
        for (key, value) in table {
            let Some(&kind) = kinds.get(&key) else {
                let valid: Vec<&str> = kinds.keys().map(String::as_str).collect();
                return Err(fail(format!(
                    "config file {shown}: unknown key {key:?}; the keys are the flags' names without --: {}",
                    valid.join(", ")
                )));
            };
            let text = |v: &toml::Value| match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                _ => None,
            };
            let parsed = match (kind, &value) {
                (Kind::Switch, toml::Value::Boolean(b)) => Some(vec![Value::Switch(*b)]),
                (Kind::Repeat, toml::Value::Array(items)) => items
                    .iter()
                    .map(|v| text(v).map(Value::Text))
                    .collect::<Option<Vec<_>>>(),
                (Kind::Repeat | Kind::Single, v) => text(v).map(|t| vec![Value::Text(t)]),
                _ => None,
            };
            let Some(parsed) = parsed else {
                return Err(fail(format!(
                    "config file {shown}: {key} = {value}: {}",
                    kind.what_to_send(&key)
                )));
            };
            values.insert(key, parsed);
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            values,
        })
    }
}

/// A file in the temporary directory, removed when dropped (the config-file tests of
/// both daemons).
#[cfg(test)]
pub(crate) struct TempFile(std::path::PathBuf);

#[cfg(test)]
impl TempFile {
    pub(crate) fn new(text: &str) -> TempFile {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "nullspace-layered-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
    pub(crate) fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

#[cfg(test)]
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Debug, Parser)]
    struct Demo {
        /// A file.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: DemoCommand,
    }

    #[derive(Debug, Subcommand)]
    enum DemoCommand {
        Run {
            /// A directory.
            #[arg(long, default_value = "/default")]
            state_dir: PathBuf,
            /// A count.
            #[arg(long, default_value_t = 1)]
            count: u32,
            /// Repeatable.
            #[arg(long)]
            set: Vec<String>,
            /// A switch.
            #[arg(long)]
            unsafe_mode: bool,
        },
        Other {
            /// Only here.
            #[arg(long)]
            team: Option<String>,
            name: String,
        },
    }

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<DemoCommand, String> {
        let env: BTreeMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        parse::<Demo>(std::iter::once("demo").chain(args.iter().copied()), |k| {
            env.get(k).cloned()
        })
        .map(|d| d.command)
        .map_err(|e| e.to_string())
    }

    fn state_dir(c: DemoCommand) -> String {
        match c {
            DemoCommand::Run { state_dir, .. } => state_dir.display().to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line_beats_the_environment_beats_the_file_beats_the_default() {
        let file = TempFile::new("state-dir = \"/file\"\n");
        let cfg = file.path();
        assert_eq!(state_dir(run(&["run"], &[]).unwrap()), "/default");
        assert_eq!(
            state_dir(run(&["run", "--config", cfg], &[]).unwrap()),
            "/file"
        );
        // Before or after the subcommand, or from the environment.
        assert_eq!(
            state_dir(run(&["--config", cfg, "run"], &[]).unwrap()),
            "/file"
        );
        assert_eq!(
            state_dir(run(&["run"], &[("NULLSPACE_CONFIG", cfg)]).unwrap()),
            "/file"
        );
        let env = [("NULLSPACE_CONFIG", cfg), ("NULLSPACE_STATE_DIR", "/env")];
        assert_eq!(state_dir(run(&["run"], &env).unwrap()), "/env");
        assert_eq!(
            state_dir(run(&["run", "--state-dir", "/cli"], &env).unwrap()),
            "/cli"
        );
        // An empty variable is unset.
        let env = [("NULLSPACE_CONFIG", cfg), ("NULLSPACE_STATE_DIR", "")];
        assert_eq!(state_dir(run(&["run"], &env).unwrap()), "/file");
        // The last of a repeated flag wins.
        assert_eq!(
            state_dir(run(&["run", "--state-dir", "/a", "--state-dir", "/b"], &[]).unwrap()),
            "/b"
        );
    }

    #[test]
    fn repeatable_flags_and_switches_come_from_arrays_lists_and_booleans() {
        let file = TempFile::new("set = [\"a=1\", \"b=2\"]\nunsafe-mode = true\ncount = 7\n");
        let cfg = file.path();
        let DemoCommand::Run {
            set,
            unsafe_mode,
            count,
            ..
        } = run(&["run", "--config", cfg], &[]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (set, unsafe_mode, count),
            (vec!["a=1".into(), "b=2".into()], true, 7)
        );
        let env = [
            ("NULLSPACE_SET", "c=3, d=4"),
            ("NULLSPACE_UNSAFE_MODE", "0"),
        ];
        let DemoCommand::Run {
            set, unsafe_mode, ..
        } = run(&["run", "--config", cfg], &env).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (set, unsafe_mode),
            (vec!["c=3".into(), "d=4".into()], false)
        );
        // Set but empty: off, as unset (a cleared variable never turns a switch on).
        let DemoCommand::Run { unsafe_mode, .. } =
            run(&["run"], &[("NULLSPACE_UNSAFE_MODE", "")]).unwrap()
        else {
            panic!()
        };
        assert!(!unsafe_mode);
        // The command line's values replace the others, not add to them.
        let DemoCommand::Run { set, .. } = run(&["run", "--set", "x=9"], &env).unwrap() else {
            panic!()
        };
        assert_eq!(set, vec!["x=9".to_string()]);
    }

    #[test]
    fn bad_files_and_values_say_what_to_send() {
        let file = TempFile::new("stat-dir = \"/x\"\n");
        let err = run(&["run", "--config", file.path()], &[]).unwrap_err();
        assert!(err.contains("unknown key \"stat-dir\""), "{err}");
        assert!(
            err.contains("count, set, state-dir, team, unsafe-mode"),
            "{err}"
        );
        // A key of another subcommand is fine.
        let file = TempFile::new("team = \"blue\"\n");
        assert_eq!(
            state_dir(run(&["run", "--config", file.path()], &[]).unwrap()),
            "/default"
        );
        let file = TempFile::new("unsafe-mode = \"yes\"\n");
        let err = run(&["run", "--config", file.path()], &[]).unwrap_err();
        assert!(
            err.contains("unsafe-mode = \"yes\": send true or false"),
            "{err}"
        );
        let file = TempFile::new("set = \"a=1\"\nstate-dir = [1]\n");
        let err = run(&["run", "--config", file.path()], &[]).unwrap_err();
        assert!(
            err.contains("state-dir = [1]: send a string or a number"),
            "{err}"
        );
        let file = TempFile::new("count = \"many\"\n");
        let err = run(&["run", "--config", file.path()], &[]).unwrap_err();
        assert!(err.contains(": count: \"many\": invalid digit"), "{err}");
        let err = run(&["run"], &[("NULLSPACE_COUNT", "-1")]).unwrap_err();
        assert!(err.contains("NULLSPACE_COUNT=-1 (--count)"), "{err}");
        let err = run(&["run"], &[("NULLSPACE_UNSAFE_MODE", "maybe")]).unwrap_err();
        assert!(err.contains("send true or false"), "{err}");
        let err = run(&["run", "--config", "/nonexistent/x.toml"], &[]).unwrap_err();
        assert!(
            err.contains("reading the config file /nonexistent/x.toml"),
            "{err}"
        );
        let file = TempFile::new("count = \n");
        let err = run(&["run", "--config", file.path()], &[]).unwrap_err();
        assert!(
            err.contains(&format!("config file {}", file.path())),
            "{err}"
        );
    }

    #[test]
    fn help_names_each_flags_variable() {
        let err = parse::<Demo>(["demo", "run", "--help"], |_| None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        let help = err.to_string();
        for var in [
            "NULLSPACE_STATE_DIR",
            "NULLSPACE_COUNT",
            "NULLSPACE_SET",
            "NULLSPACE_UNSAFE_MODE",
            "NULLSPACE_CONFIG",
        ] {
            assert!(help.contains(&format!("[env: {var}]")), "{var}: {help}");
        }
    }
}
