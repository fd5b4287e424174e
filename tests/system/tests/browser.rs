//! The headless-Chromium driver itself: load a page, wait for late text, click, evaluate,
//! emulate a phone and take a full-page screenshot.

use std::time::Duration;

use hodei_system_tests::browser::Browser;
use serde_json::json;

const PAGE: &str = "<!doctype html><title>t</title>\
    <meta name=viewport content=\"width=device-width\">\
    <p id=x></p>\
    <button id=b onclick=\"document.getElementById('x').textContent='clicked'\">go</button>\
    <script>setTimeout(() => { document.getElementById('x').textContent = 'ready' }, 300)</script>";

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

#[tokio::test]
async fn drives_a_page() {
    let browser = Browser::launch().await.unwrap();
    let page = browser.new_page().await.unwrap();

    let url = format!(
        "data:text/html,{}",
        PAGE.replace('%', "%25").replace('#', "%23")
    );
    page.goto(&url).await.unwrap();

    // The text appears only after the page's timer has fired.
    let text = page
        .wait_for(
            "document.getElementById('x').textContent === 'ready' && 'ready'",
            "the late text",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(text, json!("ready"));

    // A condition that throws until an element exists counts as "not yet", and the
    // timeout names what was awaited.
    let err = page
        .wait_for(
            "document.querySelector('#missing').textContent",
            "an element that never comes",
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(err.0.contains("timed out after"), "{err}");
    assert!(err.0.contains("an element that never comes"), "{err}");

    page.click("#b").await.unwrap();
    assert_eq!(
        page.eval("document.getElementById('x').textContent")
            .await
            .unwrap(),
        json!("clicked")
    );
    assert!(page.click("#nothing-here").await.is_err());

    // eval: promises are awaited, undefined is null, exceptions are errors.
    assert_eq!(
        page.eval("new Promise(r => setTimeout(() => r(6 * 7), 10))")
            .await
            .unwrap(),
        json!(42)
    );
    assert_eq!(page.eval("undefined").await.unwrap(), json!(null));
    let err = page.eval("throw new Error('boom')").await.unwrap_err();
    assert!(err.0.contains("boom"), "{err}");

    page.set_viewport(390, 844, true).await.unwrap();
    assert_eq!(page.eval("innerWidth").await.unwrap(), json!(390));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shots/phone.png");
    page.screenshot(&path).await.unwrap();
    let png = std::fs::read(&path).unwrap();
    assert!(
        png.starts_with(&PNG_SIGNATURE),
        "not a png: {} bytes",
        png.len()
    );
    // IHDR: the width is the phone's.
    assert_eq!(&png[16..20], &390u32.to_be_bytes());
}
