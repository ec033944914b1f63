//! Seats: activating a license on a machine (its fingerprint) and
//! releasing the seat again.

use chrono::{DateTime, Utc};

use super::SqlStore;
use super::load::{Lock, require_license};
use super::tx::{NewEvent, record_event};
use crate::domain::rules::{self, ActivateDecision};
use crate::domain::{Activation, License, LicenseKey};
use crate::store::change_notify::Change;
use crate::store::{Actor, StoreResult, micros};

impl SqlStore {
    pub(super) async fn activate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        hostname: &str,
        client_version: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<(License, Activation)> {
        self.write(Some(Change::License(key.clone())), move |mut tx| async move {
            let (id, license) = require_license(&mut tx, key, Lock::ForUpdate(self.dialect)).await?;
            match rules::activate(&license, fingerprint, now)? {
                ActivateDecision::AlreadyActivated => {
                    tx.commit().await?;
                    let activation = license
                        .activations
                        .iter()
                        .find(|a| a.fingerprint == fingerprint)
                        .cloned()
                        .expect("decided on this list");
                    Ok((license, activation))
                }
                ActivateDecision::TakeSeat => {
                    sqlx::query(
                        "INSERT INTO activations (license_id, fingerprint, hostname, client_version, activated_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(id)
                    .bind(fingerprint)
                    .bind(hostname)
                    .bind(client_version)
                    .bind(micros(now))
                    .execute(&mut *tx)
                    .await?;
                    record_event(
                        &mut tx,
                        id,
                        actor,
                        now,
                        NewEvent {
                            event_type: "activated",
                            fingerprint,
                            detail: hostname,
                            ..Default::default()
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    // The answer is the license as loaded plus this seat: the
                    // row was locked, and the trigger counts exactly this insert.
                    let activation = Activation {
                        fingerprint: fingerprint.to_string(),
                        hostname: hostname.to_string(),
                        activated_at: now,
                    };
                    let mut license = license;
                    license.seats_used += 1;
                    license.activations.push(activation.clone());
                    Ok((license, activation))
                }
            }
        })
        .await
    }

    pub(super) async fn deactivate(
        &self,
        key: &LicenseKey,
        fingerprint: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> StoreResult<License> {
        self.write(
            Some(Change::License(key.clone())),
            move |mut tx| async move {
                let (id, license) =
                    require_license(&mut tx, key, Lock::ForUpdate(self.dialect)).await?;
                rules::deactivate(&license, fingerprint)?;
                sqlx::query("DELETE FROM activations WHERE license_id = $1 AND fingerprint = $2")
                    .bind(id)
                    .bind(fingerprint)
                    .execute(&mut *tx)
                    .await?;
                record_event(
                    &mut tx,
                    id,
                    actor,
                    now,
                    NewEvent {
                        event_type: "deactivated",
                        fingerprint,
                        ..Default::default()
                    },
                )
                .await?;
                tx.commit().await?;
                // As loaded (the row was locked) minus this seat.
                let mut license = license;
                license.seats_used -= 1;
                license.activations.retain(|a| a.fingerprint != fingerprint);
                Ok(license)
            },
        )
        .await
    }
}
