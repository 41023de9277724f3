//! The catalog's build records beyond the template rows (build logs' size, the build
//! queue): kept apart from the catalog's core tables.

use super::sql::{args, Dialect};
use super::{Catalog, CatalogError};

impl Catalog {
    /// Bytes of command output (`stdout` and `stderr` lines, not the build's own
    /// `build` lines) a template's build log holds: what its byte cap counts.
    pub fn build_log_output_bytes(&self, template_id: &str) -> Result<u64, CatalogError> {
        let bytes = match self.db.dialect() {
            // LENGTH of a TEXT counts characters; of a BLOB, bytes.
            Dialect::Sqlite => "LENGTH(CAST(text AS BLOB))",
            Dialect::Postgres => "octet_length(text)",
        };
        let bytes: i64 = self
            .db
            .query_one(
                &format!(
                    "SELECT CAST(COALESCE(SUM({bytes}), 0) AS BIGINT) FROM build_logs
                     WHERE template_id = ?1 AND stream != 'build'"
                ),
                args![template_id],
            )?
            .get(0)?;
        Ok(bytes.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn output_bytes_count_bytes_of_output_lines_only() {
        for t in crate::catalog::testing::backends() {
            let c = t.catalog();
            assert_eq!(c.build_log_output_bytes("tpl-a").unwrap(), 0);
            c.append_build_log(
                "tpl-a",
                &[
                    (None, "build", "step 0 (run): echo".into()),
                    (Some(0), "stdout", "héllo".into()),
                    (Some(0), "stderr", "oops".into()),
                ],
            )
            .unwrap();
            c.append_build_log("tpl-b", &[(Some(0), "stdout", "other".into())])
                .unwrap();
            // "héllo" is 6 bytes (é is two), "oops" 4; the build line is not output.
            assert_eq!(
                c.build_log_output_bytes("tpl-a").unwrap(),
                10,
                "{}",
                t.name()
            );
            let lines = c.build_log("tpl-a", 1, 10).unwrap();
            assert_eq!(
                lines
                    .iter()
                    .map(|l| (l.seq, l.step, l.text.as_str()))
                    .collect::<Vec<_>>(),
                [(2, Some(0), "héllo"), (3, Some(0), "oops")]
            );
        }
    }
}
