// swift-tools-version: 5.9
// Loads a compiled sdbuild bundle with Apple's Swift StableDiffusion package and generates one image.
// Run on a Mac, after a build has compiled the models: `swift run -c release SmokeTest <bundle folder>`.

import PackageDescription

let package = Package(
    name: "SmokeTest",
    // StableDiffusionXLPipeline needs macOS 14.
    platforms: [.macOS(.v14)],
    dependencies: [
        // Pinned: the release whose Swift API and resource names the bundle contract follows.
        .package(url: "https://github.com/apple/ml-stable-diffusion.git", exact: "1.1.1"),
    ],
    targets: [
        .executableTarget(
            name: "SmokeTest",
            dependencies: [.product(name: "StableDiffusion", package: "ml-stable-diffusion")],
            path: "Sources/SmokeTest"
        ),
    ]
)
